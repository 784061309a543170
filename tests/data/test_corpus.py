import json
import os
import sysconfig

import pytest

from bt_jax import cli
from bt_jax.data import corpus


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


@pytest.fixture()
def text_dir(tmp_path):
  docs = {
    f"part{i // 10}/doc_{i:02d}.txt": f"document {i}\nline two of {i} — ünïcode\n"
    for i in range(40)
  }
  for rel, text in docs.items():
    write(tmp_path / "texts" / rel, text)
  return tmp_path / "texts", docs


def test_stdlib_corpus_split_by_file():
  root = sysconfig.get_paths()["stdlib"]
  train = corpus.stdlib_corpus("train")
  valid = corpus.stdlib_corpus("validation")
  train_paths, valid_paths = set(train.paths), set(valid.paths)
  assert not train_paths & valid_paths
  _, relpaths = corpus.stdlib_files()
  assert train_paths | valid_paths == {os.path.join(root, r) for r in relpaths}
  for path in train_paths | valid_paths:
    parts = os.path.relpath(path, root).split(os.sep)
    assert path.endswith(".py") and not set(parts[:-1]) & corpus.STDLIB_SKIP_DIRS
  assert os.path.join(root, "os.py") in train_paths | valid_paths
  # ~2% by hash: binomial with n ~ 700+ (3.11/3.12).
  assert 0.005 < len(valid) / (len(train) + len(valid)) < 0.04
  assert train.paths == sorted(train.paths)
  assert corpus.stdlib_corpus("validation").paths == valid.paths
  assert "import" in valid[0] or "def" in valid[0]


def test_stdlib_max_bytes():
  capped = corpus.stdlib_corpus("train", max_bytes=300_000)
  sizes = [os.path.getsize(p) for p in capped.paths]
  assert 0 < sum(sizes) <= 300_000 and len(capped) > 3
  assert set(capped.paths) <= set(corpus.stdlib_corpus("train").paths)
  with pytest.raises(ValueError, match="max_bytes=0"):
    corpus.stdlib_corpus("train", max_bytes=0)


def test_split_keys_stable_and_nonempty():
  keys = [f"f{i}.txt" for i in range(5)]
  split = corpus.split_keys(keys, 0.02)
  assert len(split["validation"]) == 1 and len(split["train"]) == 4
  assert corpus.split_keys(list(reversed(keys)), 0.02)["validation"] == [4 - split["validation"][0]]
  # Adding files never moves an existing one out of a hash-selected split.
  many = [f"f{i}.txt" for i in range(2000)]
  big = corpus.split_keys(many, 0.1)
  more = corpus.split_keys(many + [f"g{i}" for i in range(500)], 0.1)
  assert set(big["validation"]) <= set(more["validation"])
  assert corpus.split_keys(["only.txt"], 0.02) == {"train": [0], "validation": []}
  with pytest.raises(ValueError, match="validation_fraction=1.5"):
    corpus.split_keys(keys, 1.5)


def test_file_corpus_text(text_dir):
  root, docs = text_dir
  pattern = str(root / "**" / "*.txt")
  train = corpus.file_corpus(pattern, "train", validation_fraction=0.2)
  valid = list(corpus.file_corpus(pattern, "validation", validation_fraction=0.2))
  assert sorted(list(train) + valid) == sorted(docs.values())
  assert 0 < len(valid) < len(train)
  # The split depends on paths relative to the glob root, not where the root lies.
  moved = root.parent / "elsewhere"
  root.rename(moved)
  assert (
    list(corpus.file_corpus(str(moved / "**" / "*.txt"), "validation", validation_fraction=0.2))
    == valid
  )


def test_file_corpus_jsonl_and_validation_pattern(tmp_path):
  write(
    tmp_path / "train.jsonl",
    "\n".join(json.dumps({"body": f"t{i}", "id": i}) for i in range(5)) + "\n\n",
  )
  write(tmp_path / "valid.jsonl", json.dumps({"body": "v0"}) + "\n")
  train = corpus.file_corpus(
    str(tmp_path / "train.jsonl"),
    "train",
    validation_pattern=str(tmp_path / "valid.jsonl"),
    text_field="body",
  )
  valid = corpus.file_corpus(
    str(tmp_path / "train.jsonl"),
    "validation",
    validation_pattern=str(tmp_path / "valid.jsonl"),
    text_field="body",
  )
  assert list(train) == [f"t{i}" for i in range(5)] and list(valid) == ["v0"]
  with pytest.raises(ValueError, match=r"train.jsonl:1 has no field 'text'"):
    corpus.file_corpus(str(tmp_path / "train.jsonl"), "train", validation_fraction=0.0)
  # One file cannot be split by file.
  with pytest.raises(ValueError, match="'validation' split of .*train.jsonl.* is empty"):
    corpus.file_corpus(str(tmp_path / "train.jsonl"), "validation", text_field="body")


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no files match .*nothing"):
    corpus.file_corpus(str(tmp_path / "nothing" / "*.txt"))
  with pytest.raises(ValueError, match="unknown split 'test'"):
    corpus.stdlib_corpus("test")
  write(tmp_path / "empty.jsonl", "\n")
  write(tmp_path / "empty2.jsonl", "")
  with pytest.raises(ValueError, match="no documents"):
    corpus.file_corpus(str(tmp_path / "*.jsonl"), "train", validation_fraction=0.0)
  with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
    corpus.load_corpus("wiki")
  with pytest.raises(ValueError, match="needs data_dir"):
    corpus.load_corpus("tfds:local_text")


def test_tfds_round_trip(text_dir, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from bt_jax.data import prepare_tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  root, _ = text_dir
  pattern = str(root / "**" / "*.txt")
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(
    FileNotFoundError, match=r"'local_text' is not prepared .*python -m bt_jax.data.prepare_tfds"
  ):
    corpus.tfds_corpus("local_text", "train", data_dir=data_dir)
  cli.call(
    prepare_tfds, ["--input_glob", pattern, "--data_dir", data_dir, "--validation_fraction", "0.2"]
  )
  for split in corpus.SPLITS:
    from_tfds = corpus.load_corpus("tfds:local_text", split, data_dir=data_dir)
    expected = corpus.file_corpus(pattern, split, validation_fraction=0.2)
    assert sorted(from_tfds) == sorted(expected) and len(from_tfds) == len(expected)
    raw = tfds.data_source("local_text", split=split, data_dir=data_dir, download=False)
    assert sorted(x["text"].decode() for x in raw) == sorted(expected)
  with pytest.raises(cli.UserError, match="--overwrite"):
    cli.call(prepare_tfds, ["--input_glob", pattern, "--data_dir", data_dir])
  with pytest.raises(ValueError, match="no split 'test'"):
    corpus.tfds_corpus("local_text", "test", data_dir=data_dir)
  with pytest.raises(ValueError, match="catalog dataset"):
    prepare_tfds.prepare_text_dataset(pattern, data_dir, name="mnist")
  # Another name, JSON lines, explicit validation files, and a rebuild.
  write(
    tmp_path / "j" / "a.jsonl",
    json.dumps({"text": "a1"}) + "\n" + json.dumps({"text": "a2"}) + "\n",
  )
  write(tmp_path / "j" / "v.jsonl", json.dumps({"text": "v1"}) + "\n")
  for _ in range(2):
    prepare_tfds.prepare_text_dataset(
      str(tmp_path / "j" / "a.jsonl"),
      data_dir,
      name="my_lines",
      validation_glob=str(tmp_path / "j" / "v.jsonl"),
      overwrite=True,
    )
  assert sorted(corpus.tfds_corpus("my_lines", "train", data_dir=data_dir)) == ["a1", "a2"]
  assert list(corpus.tfds_corpus("my_lines", "validation", data_dir=data_dir)) == ["v1"]
