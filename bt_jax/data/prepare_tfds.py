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

import argparse
import os
import re
import shutil
from collections.abc import Sequence

import tensorflow_datasets as tfds

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
    _BUILDER_CLASSES[name] = type(class_name, (_LocalTextBuilder,), {"name": name}, skip_registration=True)
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
      split: corpus.file_corpus(input_glob, split, validation_fraction=validation_fraction,
                                validation_pattern=validation_glob, text_field=text_field)
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


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input_glob", required=True, help="text or .jsonl files ('**' recurses)")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  parser.add_argument("--name", default=DEFAULT_NAME, help="dataset name (snake_case)")
  parser.add_argument("--validation_fraction", type=float, default=corpus.DEFAULT_VALIDATION_FRACTION)
  parser.add_argument("--validation_glob", default=None, help="separate validation files (else split by file)")
  parser.add_argument("--text_field", default="text", help="the text field of .jsonl lines")
  parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
  args = parser.parse_args(argv)
  path = prepare_text_dataset(
      args.input_glob, args.data_dir, name=args.name, validation_fraction=args.validation_fraction,
      validation_glob=args.validation_glob, text_field=args.text_field, overwrite=args.overwrite)
  print(f"prepared {args.name!r} in {path}; read it with corpus spec 'tfds:{args.name}' and data_dir {args.data_dir!r}")


if __name__ == "__main__":
  main()
