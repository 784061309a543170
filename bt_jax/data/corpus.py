"""Text corpora: random-access sequences of documents (str), split into train/validation.

    docs = stdlib_corpus("train", max_bytes=2_000_000)   # the embedded default
    docs = file_corpus("data/*.jsonl", "validation")    # local text / jsonl files
    docs = read_files("pg19/test/*.txt")                 # every matching file, no split
    docs = tfds_corpus("local_text", "train", data_dir="tfds")
    docs = load_corpus("stdlib" | "files:<glob>" | "tfds:<name>", split, ...)

Local corpora are split by file, deterministically: a file goes to validation
when a stable hash (sha256) of its path relative to the corpus root falls below
`validation_fraction`, so adding or removing a file never moves another one.
When no file hashes into validation but there are at least two files, the file
with the smallest hash is taken, so a small corpus still has a validation split.

File types, the same for training and `eval_perplexity`: JSON lines
(.jsonl, .jsonl.txt, .ndjson, .json: the `text_field` of each line is a
document) and any other file as one text document; each may be gzipped (.gz).
Training replaces undecodable bytes of a text file; evaluation
(`strict=True`) refuses a file that is not UTF-8, naming it. JSON lines must
be UTF-8 either way.
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import os
import sysconfig
from collections.abc import Sequence

from bt_jax import jsonl
from bt_jax.cli import UserError

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)
DEFAULT_VALIDATION_FRACTION = 0.02
# Directory names skipped in the standard library: installed packages and test suites.
STDLIB_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
PREPARE_COMMAND = (
  "python -m bt_jax.data.prepare_tfds --input_glob '<files>' --data_dir {data_dir} --name {name}"
)


def read_text(path: str, strict: bool = False) -> str:
  """A text file (.gz allowed) as one document: UTF-8, undecodable bytes
  replaced, or with `strict` a UserError naming the file."""
  with jsonl.open_binary(path) as f:
    data = f.read()
  return jsonl.decode_utf8(data, path) if strict else data.decode("utf-8", errors="replace")


class FileDocuments(Sequence[str]):
  """One document per text file, read (UTF-8, see `read_text`) when indexed."""

  def __init__(self, paths: Sequence[str], strict: bool = False):
    self.paths = list(paths)
    self.strict = strict

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return FileDocuments(self.paths[index], self.strict)
    return read_text(self.paths[index], self.strict)

  def __repr__(self) -> str:
    return f"FileDocuments({len(self)} files)"


class TfdsDocuments(Sequence[str]):
  """The text feature of a TFDS data source (array_record), decoded to str."""

  def __init__(self, source, text_field: str = "text"):
    self.source = source
    self.text_field = text_field

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"document index {index} out of range for {len(self)} documents")
    example = self.source[index % len(self)]
    if self.text_field not in example:
      raise KeyError(f"TFDS examples have no field {self.text_field!r}; fields: {sorted(example)}")
    value = example[self.text_field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def split_fraction(key: str) -> float:
  """A stable number in [0, 1) for a file key (its relative path)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_keys(keys: Sequence[str], validation_fraction: float) -> dict[str, list[int]]:
  """Indices of `keys` in each split, by stable hash (see the module docstring)."""
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  fractions = [split_fraction(k) for k in keys]
  validation = {i for i, f in enumerate(fractions) if f < validation_fraction}
  if not validation and validation_fraction > 0 and len(keys) >= 2:
    validation = {min(range(len(keys)), key=fractions.__getitem__)}
  return {
    TRAIN: [i for i in range(len(keys)) if i not in validation],
    VALIDATION: sorted(validation),
  }


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits are {list(SPLITS)}")


def _cap_bytes(paths: list[str], keys: list[str], max_bytes: int | None) -> list[str]:
  """At most max_bytes of files, taken in hash order (a spread-out sample), returned sorted."""
  if max_bytes is None:
    return paths
  if max_bytes <= 0:
    raise ValueError(f"max_bytes={max_bytes} must be positive (or None for no cap)")
  order = sorted(range(len(paths)), key=lambda i: split_fraction("cap:" + keys[i]))
  chosen, total = [], 0
  for i in order:
    size = os.path.getsize(paths[i])
    if chosen and total + size > max_bytes:
      continue
    chosen.append(i)
    total += size
  return [paths[i] for i in sorted(chosen)]


def stdlib_files(stdlib_dir: str | None = None) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the interpreter's standard-library sources."""
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  relpaths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
    relpaths.extend(
      os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")
    )
  return root, sorted(relpaths)


def stdlib_corpus(
  split: str = TRAIN,
  *,
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
  max_bytes: int | None = None,
  stdlib_dir: str | None = None,
) -> FileDocuments:
  """The running interpreter's standard library (*.py, no site-packages or tests), one file a document.

  `max_bytes` caps the split's total size (a quickstart corpus); the cap keeps a
  hash-ordered sample of whole files.
  """
  _check_split(split)
  root, relpaths = stdlib_files(stdlib_dir)
  if not relpaths:
    raise ValueError(f"no .py files found under the standard library directory {root!r}")
  indices = split_keys(relpaths, validation_fraction)[split]
  if not indices:
    raise ValueError(
      f"the {split!r} split of the standard library corpus ({len(relpaths)} files, "
      f"validation_fraction={validation_fraction}) is empty"
    )
  keys = [relpaths[i] for i in indices]
  paths = _cap_bytes([os.path.join(root, k) for k in keys], keys, max_bytes)
  return FileDocuments(paths)


def _glob_root(pattern: str) -> str:
  """The directory part of a glob before its first wildcard (the corpus root)."""
  parts = os.path.normpath(pattern).split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if glob_lib.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or "."


def match_files(pattern: str) -> tuple[list[str], list[str]]:
  """(sorted paths, keys relative to the glob root) of the files matching pattern."""
  paths = sorted(
    p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
  )
  if not paths:
    raise FileNotFoundError(
      f"no files match {pattern!r}; give a glob of text or JSON-lines "
      "files, e.g. 'data/*.txt' or 'data/**/*.jsonl.gz'"
    )
  root = _glob_root(os.path.expanduser(pattern))
  return paths, [os.path.relpath(p, root) for p in paths]


JSONL_SUFFIXES = (".jsonl", ".jsonl.txt", ".ndjson", ".json")


def is_jsonl(path: str) -> bool:
  """Whether a corpus file is JSON lines (by its name, a .gz suffix aside)."""
  name = path[: -len(".gz")] if path.endswith(".gz") else path
  return name.endswith(JSONL_SUFFIXES)


def read_jsonl(path: str, text_field: str = "text") -> list[str]:
  """The `text_field` of each non-empty line of a JSON-lines file."""
  texts = []
  for line_number, record in jsonl.read_jsonl(path, line_numbers=True):
    if not isinstance(record, dict) or text_field not in record:
      fields = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise UserError(
        f"{path}:{line_number} has no field {text_field!r} (has {fields}); set "
        "the text field to one of those"
      )
    texts.append(str(record[text_field]))
  return texts


def documents_from_files(
  paths: Sequence[str], text_field: str = "text", strict: bool = False
) -> Sequence[str]:
  """Text files as one document each (lazily read); JSON-lines files as one
  document a line (see the module docstring for the file types)."""
  if not any(is_jsonl(p) for p in paths):
    return FileDocuments(paths, strict)
  docs: list[str] = []
  for p in paths:
    if is_jsonl(p):
      docs.extend(read_jsonl(p, text_field))
    else:
      docs.append(read_text(p, strict))
  return docs


def read_files(pattern: str, text_field: str = "text", strict: bool = True) -> Sequence[str]:
  """Every document of the files matching `pattern` (no split): what
  `eval_perplexity` scores. An empty result is a UserError."""
  paths, _ = match_files(pattern)
  docs = documents_from_files(paths, text_field, strict)
  if len(docs) == 0:
    raise UserError(
      f"the files matching {pattern!r} hold no documents (empty JSON-lines "
      "files?); give files with text"
    )
  return docs


def split_files(
  pattern: str,
  split: str,
  *,
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
  validation_pattern: str | None = None,
  max_bytes: int | None = None,
) -> list[str]:
  """The files of one split: by hash of the relative path, or from `validation_pattern`."""
  _check_split(split)
  if validation_pattern is not None:
    paths, keys = match_files(validation_pattern if split == VALIDATION else pattern)
  else:
    all_paths, all_keys = match_files(pattern)
    indices = split_keys(all_keys, validation_fraction)[split]
    if not indices:
      raise UserError(
        f"the {split!r} split of {pattern!r} is empty: {len(all_paths)} file(s) matched and the "
        f"split is by file (validation_fraction={validation_fraction}); add files, change "
        "validation_fraction, or pass a separate validation_pattern"
      )
    paths, keys = [all_paths[i] for i in indices], [all_keys[i] for i in indices]
  return _cap_bytes(paths, keys, max_bytes)


def file_corpus(
  pattern: str,
  split: str = TRAIN,
  *,
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
  validation_pattern: str | None = None,
  text_field: str = "text",
  max_bytes: int | None = None,
) -> Sequence[str]:
  """Local text files (one document each) or JSON-lines files (`text_field` of each line).

  With `validation_pattern`, `pattern` is all training data and `validation_pattern`
  all validation data; otherwise the files of `pattern` are split by hash.
  """
  paths = split_files(
    pattern,
    split,
    validation_fraction=validation_fraction,
    validation_pattern=validation_pattern,
    max_bytes=max_bytes,
  )
  docs = documents_from_files(paths, text_field)
  if len(docs) == 0:
    raise UserError(
      f"the {split!r} split of {pattern!r} has files but no documents (empty JSON-lines files?)"
    )
  return docs


def tfds_corpus(
  name: str, split: str = TRAIN, *, data_dir: str, text_field: str = "text"
) -> TfdsDocuments:
  """A TFDS dataset prepared in array_record format under data_dir, read with tfds.data_source."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only here)

  prepare = PREPARE_COMMAND.format(data_dir=data_dir, name=name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r}; prepare local text files "
      f"with: {prepare}"
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r}; prepare local text files "
      f"with: {prepare} (catalog datasets: tfds build {name} --file_format=array_record "
      f"--data_dir={data_dir})"
    )
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format != "array_record":
    raise ValueError(
      f"TFDS dataset {name!r} in {data_dir!r} is stored as {file_format!r}; reading without "
      "TensorFlow needs file_format='array_record' (rebuild it in that format)"
    )
  if split not in builder.info.splits:
    raise ValueError(
      f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}"
    )
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  if len(source) == 0:
    raise ValueError(f"the {split!r} split of TFDS dataset {name!r} in {data_dir!r} is empty")
  return TfdsDocuments(source, text_field)


def load_corpus(
  spec: str,
  split: str = TRAIN,
  *,
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
  max_bytes: int | None = None,
  validation_pattern: str | None = None,
  text_field: str = "text",
  data_dir: str | None = None,
) -> Sequence[str]:
  """One entry point for flags and gin: spec is "stdlib", "files:<glob>" or "tfds:<name>"."""
  if spec == "stdlib":
    return stdlib_corpus(split, validation_fraction=validation_fraction, max_bytes=max_bytes)
  if spec.startswith("files:"):
    return file_corpus(
      spec[len("files:") :],
      split,
      validation_fraction=validation_fraction,
      validation_pattern=validation_pattern,
      text_field=text_field,
      max_bytes=max_bytes,
    )
  if spec.startswith("tfds:"):
    if data_dir is None:
      raise ValueError(
        f"corpus {spec!r} needs data_dir (the directory the dataset was prepared in)"
      )
    return tfds_corpus(spec[len("tfds:") :], split, data_dir=data_dir, text_field=text_field)
  raise ValueError(f"unknown corpus {spec!r}; valid: 'stdlib', 'files:<glob>', 'tfds:<name>'")
