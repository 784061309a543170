"""Loaders and prompts on small fixture files in the raw formats, and on TFDS
array_record datasets prepared offline from the same files."""

import json
import os
import shutil
from unittest import mock

import pytest

from bt_jax import cli
from bt_jax.eval import tasks
from bt_jax.eval.tasks import MultipleChoiceDoc, load_task

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ARC_DIR = os.path.join(FIXTURES, "ARC-V1-Feb2018-2")

HELLASWAG_EXPECTED = [
  MultipleChoiceDoc(
    "24",
    "Roof shingle removal: A man is sitting on a roof. He",
    (
      "is using wrap to wrap a pair of skis.",
      "is ripping level tiles off.",
      "is holding a rubik's cube.",
      "starts pulling up roofing on a roof.",
    ),
    3,
  ),
  # ctx_b.capitalize() lower-cases the rest of ctx_b.
  MultipleChoiceDoc(
    "92",
    "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
    (
      "swings and lands in her arms.",
      "pulls the barbell forward.",
      "pulls a rope attached to the barbell.",
      "stands and lifts the weight over her head.",
    ),
    0,
  ),
  # Empty ctx_b; [title] -> ". "; bracket groups deleted after the strip (so a
  # leading space can remain); one pass of "  " -> " " (three spaces leave two).
  MultipleChoiceDoc(
    "106",
    "Home and Garden: How to grow tomatoes. Pick a sunny spot.",
    (" Water them  daily.", "Plant the seeds. in spring.", "Dig a hole.", "Sing to them."),
    1,
  ),
  MultipleChoiceDoc(
    "130",
    "Food and Entertaining: How to bake bread. Mix the dough. Knead it for ten "
    "minutes. Then let it rise",
    (
      ", eat it raw.",
      "in the freezer overnight.",
      "in a warm place for an hour.",
      "and throw it away.",
    ),
    2,
  ),
]

PIQA_EXPECTED = [
  MultipleChoiceDoc(
    "p1", "Question: How do I open a jar?\nAnswer:", ("Twist the lid.", "Eat the lid."), 0
  ),
  MultipleChoiceDoc(
    "p2", "Question: To dry wet hair\nAnswer:", ("use a wet towel", "use a dry towel"), 1
  ),
  MultipleChoiceDoc(
    "p3",
    "Question: Keep bread fresh\nAnswer:",
    ("Store it in a sealed bag.", "Store it in the oven while it runs."),
    0,
  ),
]

ARC_EASY_EXPECTED = [
  MultipleChoiceDoc(
    "Mercury_1",
    "Question: Which of these is a mammal?\nAnswer:",
    ("shark", "whale", "trout", "frog"),
    1,
  ),
  MultipleChoiceDoc(
    "NYSEDREGENTS_2", "Question: What melts ice fastest?\nAnswer:", ("salt", "sand", "sawdust"), 0
  ),
  MultipleChoiceDoc(
    "Mercury_3",
    "Question: Which gas do plants take in?\nAnswer:",
    ("oxygen", "nitrogen", "carbon dioxide", "helium", "neon"),
    2,
  ),
]


def test_preprocess_hellaswag():
  assert tasks.preprocess_hellaswag("  a [title] b [x y] c  d   e ") == "a. b c d  e"


def test_hellaswag_raw():
  assert (
    tasks.read_hellaswag_jsonl(os.path.join(FIXTURES, "hellaswag_val.jsonl")) == HELLASWAG_EXPECTED
  )
  # A folder holding the file works too; continuations get the leading space.
  docs = load_task("hellaswag", FIXTURES, limit=1)
  assert docs == HELLASWAG_EXPECTED[:1]
  assert docs[0].continuations[0] == " is using wrap to wrap a pair of skis."


def test_hellaswag_string_label_and_unlabelled():
  record = json.loads(open(os.path.join(FIXTURES, "hellaswag_val.jsonl")).readline())
  assert tasks.hellaswag_doc(dict(record, label="3")).gold == 3
  with pytest.raises(ValueError, match="no label"):
    tasks.hellaswag_doc({k: v for k, v in record.items() if k != "label"})


def test_piqa_raw(tmp_path):
  assert load_task("piqa", os.path.join(FIXTURES, "valid.jsonl")) == PIQA_EXPECTED
  # The zip's layout: dev.jsonl + dev-labels.lst in physicaliqa-train-dev/.
  folder = tmp_path / "physicaliqa-train-dev"
  folder.mkdir()
  shutil.copy(os.path.join(FIXTURES, "valid.jsonl"), folder / "dev.jsonl")
  shutil.copy(os.path.join(FIXTURES, "valid-labels.lst"), folder / "dev-labels.lst")
  assert load_task("piqa", str(tmp_path)) == PIQA_EXPECTED
  os.remove(folder / "dev-labels.lst")
  with pytest.raises(FileNotFoundError, match="dev-labels.lst.*yonatanbisk.com/piqa"):
    load_task("piqa", str(tmp_path))
  (folder / "dev-labels.lst").write_text("0\n1\n")
  with pytest.raises(ValueError, match="2 labels but .* 3 questions"):
    load_task("piqa", str(tmp_path))


def test_arc_raw():
  assert load_task("arc_easy", ARC_DIR) == ARC_EASY_EXPECTED
  assert load_task("arc_easy", FIXTURES) == ARC_EASY_EXPECTED  # the unzipped folder
  challenge = load_task("arc_challenge", os.path.join(ARC_DIR, "ARC-Challenge"))
  assert [(d.context, d.choices[d.gold]) for d in challenge] == [
    ("Question: A student drops a ball. Which force pulls it down?\nAnswer:", "gravity"),
    ("Question: Which is a renewable resource?\nAnswer:", "wind"),
  ]
  with pytest.raises(ValueError, match="answerKey 'F'"):
    tasks.arc_doc(
      {
        "id": "x",
        "answerKey": "F",
        "question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]},
      }
    )


_HELLASWAG_LINE = open(os.path.join(FIXTURES, "hellaswag_val.jsonl"), encoding="utf-8").readline()
_PIQA_LINE = open(os.path.join(FIXTURES, "valid.jsonl"), encoding="utf-8").readline()


@pytest.mark.parametrize(
  "task, name, text, labels, message",
  [
    (
      "hellaswag",
      "h.jsonl",
      _HELLASWAG_LINE + "\n[1, 2]\n",
      None,
      r"h.jsonl:3 is not a valid HellaSwag record \('list' object .*; expected a JSON object with",
    ),
    (
      "hellaswag",
      "h.jsonl",
      _HELLASWAG_LINE + '{"label": 0, "activity_label": "a"}\n',
      None,
      r"h.jsonl:2 is not a valid HellaSwag record \(no field 'ctx_a'\)",
    ),
    (
      "hellaswag",
      "h.jsonl",
      _HELLASWAG_LINE + '{"ind": 5}\n',
      None,
      r"h.jsonl:2: HellaSwag record 5 has no label",
    ),
    ("hellaswag", "h.jsonl", _HELLASWAG_LINE + '{"ind": 5\n', None, r"h.jsonl:2 is not valid JSON"),
    (
      "arc_easy",
      "a.jsonl",
      '{"id": "y", "question": "q?", "answerKey": "A"}\n',
      None,
      r"a.jsonl:1 is not a valid ARC record \(string indices",
    ),
    (
      "arc_easy",
      "a.jsonl",
      '{"id": "y", "question": {"stem": "q", "choices": []}, "answerKey": "A"}\n',
      None,
      r"a.jsonl:1: ARC question 'y': answerKey 'A' is not one of",
    ),
    (
      "piqa",
      "valid.jsonl",
      _PIQA_LINE + '"a string"\n',
      "0\n1\n",
      r"valid.jsonl:2 is not a valid PIQA record .*\"goal\", \"sol1\" and \"sol2\"",
    ),
    (
      "piqa",
      "valid.jsonl",
      _PIQA_LINE * 2,
      "0\n\nyes\n",
      r"valid-labels.lst:3: label 'yes' is not 0 or 1",
    ),
    ("piqa", "valid.jsonl", _PIQA_LINE * 2, "0\n2\n", r"valid-labels.lst:2: label '2' is not 0"),
  ],
)
def test_bad_records_name_the_file_and_line(tmp_path, task, name, text, labels, message):
  (tmp_path / name).write_text(text, encoding="utf-8")
  if labels is not None:
    (tmp_path / "valid-labels.lst").write_text(labels, encoding="utf-8")
  with pytest.raises(cli.UserError, match=message):
    load_task(task, str(tmp_path / name))


def test_missing_data_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="rowanz/hellaswag"):
    load_task("hellaswag", str(tmp_path / "nope.jsonl"))
  with pytest.raises(FileNotFoundError, match="ARC-V1-Feb2018.zip"):
    load_task("arc_challenge", str(tmp_path))
  with pytest.raises(ValueError, match="unknown task 'mmlu'"):
    load_task("mmlu", str(tmp_path))


# ---------------------------------------------------------------------------
# TFDS: the real builders, prepared in array_record format from the fixture
# files by standing in for the download manager.


def _raw_download_dir(tmp):
  raw = tmp / "raw"
  piqa = raw / "physicaliqa-train-dev"
  piqa.mkdir(parents=True)
  for split in ("train", "dev"):
    shutil.copy(os.path.join(FIXTURES, "valid.jsonl"), piqa / f"{split}.jsonl")
    shutil.copy(os.path.join(FIXTURES, "valid-labels.lst"), piqa / f"{split}-labels.lst")
  for config in ("ARC-Easy", "ARC-Challenge"):
    folder = raw / "ARC-V1-Feb2018-2" / config
    folder.mkdir(parents=True)
    for split in ("Train", "Dev", "Test"):
      shutil.copy(
        os.path.join(ARC_DIR, config, f"{config}-Test.jsonl"), folder / f"{config}-{split}.jsonl"
      )
  return raw


def _fake_download(raw):
  def download_and_extract(self, url_or_urls):
    del self
    if isinstance(url_or_urls, dict):  # hellaswag: one jsonl per split
      return {k: os.path.join(FIXTURES, "hellaswag_val.jsonl") for k in url_or_urls}
    return str(raw)

  return download_and_extract


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow_datasets.text.hellaswag  # noqa: F401  registers the builder

  tmp = tmp_path_factory.mktemp("tfds")
  raw = _raw_download_dir(tmp)
  data_dir = str(tmp / "data")
  config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  with mock.patch.object(
    tfds.download.DownloadManager, "download_and_extract", _fake_download(raw)
  ):
    for name in ("hellaswag", "piqa", "ai2_arc/ARC-Easy", "ai2_arc/ARC-Challenge"):
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare(download_config=config)
  return data_dir


def _by_id(docs):
  return sorted(docs, key=lambda d: d.doc_id)


def test_tfds_piqa_and_arc_match_raw(tfds_dir):
  assert _by_id(load_task("piqa", "tfds:" + tfds_dir)) == _by_id(PIQA_EXPECTED)
  assert _by_id(load_task("arc_easy", tfds_dir)) == _by_id(ARC_EASY_EXPECTED)
  raw = load_task("arc_challenge", os.path.join(ARC_DIR, "ARC-Challenge"))
  assert _by_id(load_task("arc_challenge", "tfds:" + tfds_dir)) == _by_id(raw)


def test_tfds_hellaswag_uses_joined_context(tfds_dir):
  docs = sorted(load_task("hellaswag", "tfds:" + tfds_dir), key=lambda d: d.gold)
  assert [d.choices for d in docs] == [
    d.choices for d in sorted(HELLASWAG_EXPECTED, key=lambda d: d.gold)
  ]
  # ctx_b is not capitalised: TFDS keeps only the joined ctx.
  assert [d.context for d in docs] == [
    "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the LADY",
    "Home and Garden: How to grow tomatoes. Pick a sunny spot.",
    "Food and Entertaining: How to bake bread. Mix the dough. Knead it for ten minutes. "
    "then let it rise",
    "Roof shingle removal: A man is sitting on a roof. he",
  ]


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset 'piqa'.*tfds build piqa"):
    load_task("piqa", "tfds:" + str(tmp_path))
  # A tfrecord-format dataset cannot be read without TensorFlow.
  shutil.copytree(os.path.join(tfds_dir, "piqa"), tmp_path / "piqa")
  info_path = next((tmp_path / "piqa").glob("*/dataset_info.json"))
  info_path.write_text(info_path.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(RuntimeError, match="array_record"):
    load_task("piqa", "tfds:" + str(tmp_path))


def test_tfds_example_conversion_on_dicts():
  """Examples shaped like TFDS's (bytes texts, ClassLabel ids)."""
  import numpy as np

  doc = tasks.arc_doc_from_tfds(
    {
      "id": b"q1",
      "question": b"Why?",
      "answerKey": 2,
      "choices": {"text": np.array([b"a", b"b", b"c"], object), "label": np.array([0, 1, 2])},
    },
    "test_0",
  )
  assert doc == MultipleChoiceDoc("q1", "Question: Why?\nAnswer:", ("a", "b", "c"), 2)
  with pytest.raises(ValueError, match="no label"):
    tasks.hellaswag_doc_from_tfds(
      {"context": b"c", "activity_label": b"a", "label": -1, "endings": [b"x"]}, "test_0"
    )
