"""Turns local text (or JSON-lines) files into a TFDS dataset in array_record format.

    python -m bt_jax.data.prepare_tfds --input_glob 'corpus/*.txt' --data_dir tfds \
        [--name local_text] [--validation_fraction 0.02] [--validation_glob 'held_out/*.txt']

The result has one "text" feature and "train"/"validation" splits (split by file
exactly like `corpus.file_corpus`), and is read back without TensorFlow:

    tfds_corpus("local_text", "train", data_dir="tfds")
    # == tfds.data_source("local_text", split="train", data_dir="tfds", download=False)

The builder is not registered under its name, so reading goes through the
files' own dataset_info.json and needs none of this code.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import flags

from bt_jax import cli
from bt_jax.data import corpus

DEFAULT_NAME = "local_text"
DATASET_VERSION = "1.0.0"


class _LocalTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-name builders made by `_builder_class`; documents set per instance."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Local text files, one document per text file or JSON line."}

  def __init__(self, *, documents: dict[str, Sequence[str]] | None = None, **kwargs):
    self._documents = documents or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs would look for README/citation files.
    return tfds.core.DatasetInfo(
      builder=self,
      description="Local text documents prepared by bt_jax.data.prepare_tfds.",
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._documents:
      raise ValueError(f"{self.name}: no documents given; prepare it with bt_jax.data.prepare_tfds")
    return {split: self._generate_examples(docs) for split, docs in self._documents.items()}

  def _generate_examples(self, docs):
    for index in range(len(docs)):
      yield index, {"text": docs[index]}


_BUILDER_CLASSES: dict[str, type] = {}


def _builder_class(name: str) -> type:
  if name not in _BUILDER_CLASSES:
    class_name = "".join(part.capitalize() for part in name.split("_")) or "LocalText"
    _BUILDER_CLASSES[name] = type(
      class_name, (_LocalTextBuilder,), {"name": name}, skip_registration=True
    )
  return _BUILDER_CLASSES[name]


def prepare_text_dataset(
  input_glob: str,
  data_dir: str,
  *,
  name: str = DEFAULT_NAME,
  validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
  validation_glob: str | None = None,
  text_field: str = "text",
  overwrite: bool = False,
) -> str:
  """Writes `data_dir/name/1.0.0/` (array_record) and returns that directory."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"dataset name {name!r} must be snake_case: a lowercase letter then [a-z0-9_]")
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    pass
  else:
    raise ValueError(f"{name!r} is the name of a TFDS catalog dataset; choose another --name")
  documents = {
    split: corpus.file_corpus(
      input_glob,
      split,
      validation_fraction=validation_fraction,
      validation_pattern=validation_glob,
      text_field=text_field,
    )
    for split in corpus.SPLITS
  }
  version_dir = os.path.join(data_dir, name, DATASET_VERSION)
  if os.path.exists(version_dir):
    if not overwrite:
      raise FileExistsError(f"{version_dir!r} already exists; pass --overwrite to rebuild it")
    shutil.rmtree(version_dir)
  builder = _builder_class(name)(documents=documents, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return version_dir


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string(
    "input_glob", None, "Text or .jsonl files ('**' recurses; .gz allowed).", required=True, **fv
  )
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.", required=True, **fv)
  flags.DEFINE_string("name", DEFAULT_NAME, "Dataset name (snake_case).", **fv)
  flags.DEFINE_float(
    "validation_fraction",
    corpus.DEFAULT_VALIDATION_FRACTION,
    "Share of files (by hash of the path) in the validation split.",
    **fv,
  )
  flags.DEFINE_string(
    "validation_glob", None, "Separate validation files (else split by file).", **fv
  )
  flags.DEFINE_string("text_field", "text", "The text field of .jsonl lines.", **fv)
  flags.DEFINE_bool("overwrite", False, "Rebuild an existing dataset.", **fv)


def main(flag_values: flags.FlagValues) -> str:
  name = flag_values.name
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise cli.UserError(f"--name {name!r} must be snake_case: a lowercase letter then [a-z0-9_]")
  try:
    path = prepare_text_dataset(
      flag_values.input_glob,
      flag_values.data_dir,
      name=name,
      validation_fraction=flag_values.validation_fraction,
      validation_glob=flag_values.validation_glob,
      text_field=flag_values.text_field,
      overwrite=flag_values.overwrite,
    )
  except (FileExistsError, KeyError, ValueError) as e:  # an existing dataset, a bad file
    raise cli.UserError(cli.one_line(e)) from e
  print(
    f"prepared {name!r} in {path}; read it with corpus spec 'tfds:{name}' and data_dir "
    f"{flag_values.data_dir!r}"
  )
  return path


if __name__ == "__main__":
  cli.run(main, define_flags)
