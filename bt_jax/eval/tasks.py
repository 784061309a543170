"""Zero-shot multiple-choice tasks: loaders and prompts (lm-evaluation-harness conventions).

Every task becomes a list of `MultipleChoiceDoc`: a context, the choice texts
and the gold index. The continuation scored for a choice is " " + choice (the
harness's target delimiter). Prompts and HellaSwag preprocessing are those of
EleutherAI lm-evaluation-harness 0.4.x, so the numbers are comparable to papers.

Two kinds of sources, nothing is ever downloaded:
- the raw files as their authors publish them (`load_task(name, path)` with a
  file or a folder holding it), and
- a prepared TFDS data_dir (`load_task(name, "tfds:DIR")`, or a folder holding
  the builder's folder). Without TensorFlow only array_record datasets can be
  read (`tfds.data_source`).
TFDS's hellaswag keeps only the joined `ctx`, so its HellaSwag prompt is an
approximation of the harness's (see `hellaswag_doc_from_tfds`).

The same raw files can be scored by the harness itself, offline: the task
YAMLs in `LM_EVAL_TASKS_DIR` (hellaswag_local, piqa_local, arc_easy_local,
arc_challenge_local, tag bt_jax_local) are the official task definitions
reading these files, for lm-eval's `--include_path`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import logging

from bt_jax.cli import UserError
from bt_jax.jsonl import decode_utf8, read_jsonl

# lm-evaluation-harness task YAMLs that read the raw files below from the
# working directory (`--include_path`); see the YAMLs' comments.
LM_EVAL_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceDoc:
  """One question: the model scores " " + choice after `context`."""

  doc_id: str
  context: str
  choices: tuple[str, ...]  # choice texts, without the leading space
  gold: int

  def __post_init__(self):
    if not self.choices:
      raise ValueError(f"doc {self.doc_id!r} has no choices")
    if not 0 <= self.gold < len(self.choices):
      raise ValueError(
        f"doc {self.doc_id!r}: gold index {self.gold} is outside the "
        f"{len(self.choices)} choices (valid 0..{len(self.choices) - 1})"
      )

  @property
  def continuations(self) -> tuple[str, ...]:
    return tuple(" " + choice for choice in self.choices)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  split: str  # the split published numbers score
  tfds_name: str  # builder name, with its config for ARC
  raw_candidates: tuple[str, ...]  # where the raw file sits inside a folder
  where_to_get: str


_HELLASWAG_HELP = (
  "HellaSwag: download hellaswag_val.jsonl from "
  "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl "
  "(https://github.com/rowanz/hellaswag), or prepare the TFDS builder `hellaswag` in "
  "array_record format on a machine with network access: "
  "`tfds build hellaswag --file_format=array_record --data_dir=DIR`."
)
_PIQA_HELP = (
  "PIQA: download valid.jsonl and valid-labels.lst from https://yonatanbisk.com/piqa/ "
  "(https://github.com/ybisk/ybisk.github.io/tree/master/piqa/data), or "
  "physicaliqa-train-dev.zip (dev.jsonl, dev-labels.lst) from "
  "https://storage.googleapis.com/ai2-mosaic/public/physicaliqa/physicaliqa-train-dev.zip, "
  "or prepare the TFDS builder `piqa` in array_record format: "
  "`tfds build piqa --file_format=array_record --data_dir=DIR`."
)
_ARC_HELP = (
  "ARC: download ARC-V1-Feb2018.zip from https://allenai.org/data/arc "
  "(https://ai2-public-datasets.s3-us-west-2.amazonaws.com/arc/ARC-V1-Feb2018.zip) and "
  "unzip it (ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl, "
  "ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl), or prepare the TFDS builder "
  "`ai2_arc` in array_record format: "
  "`tfds build ai2_arc --file_format=array_record --data_dir=DIR`."
)

TASKS: dict[str, TaskSpec] = {
  "hellaswag": TaskSpec(
    "hellaswag",
    "validation",
    "hellaswag",
    ("hellaswag_val.jsonl", "data/hellaswag_val.jsonl"),
    _HELLASWAG_HELP,
  ),
  "piqa": TaskSpec(
    "piqa",
    "validation",
    "piqa",
    ("valid.jsonl", "dev.jsonl", "data/valid.jsonl", "physicaliqa-train-dev/dev.jsonl"),
    _PIQA_HELP,
  ),
  "arc_easy": TaskSpec(
    "arc_easy",
    "test",
    "ai2_arc/ARC-Easy",
    (
      "ARC-Easy-Test.jsonl",
      "ARC-Easy/ARC-Easy-Test.jsonl",
      "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl",
    ),
    _ARC_HELP,
  ),
  "arc_challenge": TaskSpec(
    "arc_challenge",
    "test",
    "ai2_arc/ARC-Challenge",
    (
      "ARC-Challenge-Test.jsonl",
      "ARC-Challenge/ARC-Challenge-Test.jsonl",
      "ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl",
    ),
    _ARC_HELP,
  ),
}


def task_spec(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)}")
  return TASKS[name]


# ---------------------------------------------------------------------------
# Prompts.


def preprocess_hellaswag(text: str) -> str:
  """The harness's HellaSwag cleanup (brackets are WikiHow artifacts)."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  # One pass of str.replace, like the harness: three spaces become two.
  return text.replace("  ", " ")


def arc_prompt(question: str) -> str:
  return "Question: " + question + "\nAnswer:"


def piqa_prompt(goal: str) -> str:
  return "Question: " + goal + "\nAnswer:"


def hellaswag_doc(record: Mapping[str, Any], doc_id: Optional[str] = None) -> MultipleChoiceDoc:
  """A raw HellaSwag jsonl record -> the harness's prompt and choices."""
  if record.get("label") in (None, ""):
    raise ValueError(
      f"HellaSwag record {record.get('ind', doc_id)!r} has no label (the test split is "
      "unlabelled); score hellaswag_val.jsonl instead"
    )
  context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
  return MultipleChoiceDoc(
    doc_id=str(record.get("ind", doc_id)),
    context=preprocess_hellaswag(record["activity_label"] + ": " + context),
    choices=tuple(preprocess_hellaswag(ending) for ending in record["endings"]),
    gold=int(record["label"]),
  )


def piqa_doc(
  record: Mapping[str, Any], label: Any, doc_id: Optional[str] = None
) -> MultipleChoiceDoc:
  return MultipleChoiceDoc(
    doc_id=str(record.get("id", doc_id)),
    context=piqa_prompt(record["goal"]),
    choices=(record["sol1"], record["sol2"]),
    gold=int(label),
  )


def _arc_gold(labels: Sequence[Any], answer_key: Any, doc_id: str) -> int:
  labels = list(labels)
  if answer_key not in labels:
    raise ValueError(
      f"ARC question {doc_id!r}: answerKey {answer_key!r} is not one of the choice labels {labels}"
    )
  return labels.index(answer_key)


def arc_doc(record: Mapping[str, Any]) -> MultipleChoiceDoc:
  """A raw ARC jsonl record ({"id", "question": {"stem", "choices"}, "answerKey"})."""
  question = record["question"]
  choices = question["choices"]
  return MultipleChoiceDoc(
    doc_id=str(record["id"]),
    context=arc_prompt(question["stem"]),
    choices=tuple(choice["text"] for choice in choices),
    gold=_arc_gold([choice["label"] for choice in choices], record["answerKey"], record["id"]),
  )


# ---------------------------------------------------------------------------
# TFDS examples (data_source gives bytes for Text and ints for ClassLabel).


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar
    return _text(value.item())
  return str(value)


def _texts(values: Iterable[Any]) -> tuple[str, ...]:
  return tuple(_text(value) for value in values)


_warned_tfds_hellaswag = False


def hellaswag_doc_from_tfds(example: Mapping[str, Any], doc_id: str) -> MultipleChoiceDoc:
  """A TFDS hellaswag example -> an approximation of the harness prompt.

  TFDS keeps the joined `context` (= ctx_a + " " + ctx_b) but drops ctx_a and
  ctx_b, so the harness's ctx_b.capitalize() (first letter upper, the rest of
  ctx_b lower) cannot be applied. The prompt used is
  preprocess(activity_label + ": " + context), which differs from the harness
  whenever ctx_b is not already capitalised: numbers from it are close to, but
  not exactly, the published HellaSwag numbers. Use hellaswag_val.jsonl for those.
  """
  global _warned_tfds_hellaswag
  if not _warned_tfds_hellaswag:
    logging.warning(
      "TFDS hellaswag drops ctx_a/ctx_b: the prompt is built from the joined context "
      "without the harness's ctx_b.capitalize(), so scores only approximate the "
      "lm-evaluation-harness numbers; use the raw hellaswag_val.jsonl for exact ones."
    )
    _warned_tfds_hellaswag = True
  label = int(example["label"])
  if label < 0:
    raise ValueError(
      f"HellaSwag example {doc_id!r} has no label (the test split is unlabelled); "
      "use the validation split"
    )
  context = _text(example["activity_label"]) + ": " + _text(example["context"])
  return MultipleChoiceDoc(
    doc_id=doc_id,
    context=preprocess_hellaswag(context),
    choices=tuple(preprocess_hellaswag(ending) for ending in _texts(example["endings"])),
    gold=label,
  )


def piqa_doc_from_tfds(example: Mapping[str, Any], doc_id: str) -> MultipleChoiceDoc:
  return MultipleChoiceDoc(
    doc_id=_text(example.get("id", doc_id)),
    context=piqa_prompt(_text(example["goal"])),
    choices=(_text(example["sol1"]), _text(example["sol2"])),
    gold=int(example["label"]),
  )


def arc_doc_from_tfds(example: Mapping[str, Any], doc_id: str) -> MultipleChoiceDoc:
  """TFDS ai2_arc: labels and answerKey are ClassLabel ids (A..E -> 0..4)."""
  choices = example["choices"]
  labels = [int(label) for label in choices["label"]]
  name = _text(example.get("id", doc_id))
  return MultipleChoiceDoc(
    doc_id=name,
    context=arc_prompt(_text(example["question"])),
    choices=_texts(choices["text"]),
    gold=_arc_gold(labels, int(example["answerKey"]), name),
  )


_TFDS_CONVERTERS = {
  "hellaswag": hellaswag_doc_from_tfds,
  "piqa": piqa_doc_from_tfds,
  "arc_easy": arc_doc_from_tfds,
  "arc_challenge": arc_doc_from_tfds,
}


# ---------------------------------------------------------------------------
# Raw files.


_RECORD_FIELDS = {
  "HellaSwag": 'a JSON object with "ind", "activity_label", "ctx_a", "ctx_b", "endings" (4 '
  'strings) and "label", as in hellaswag_val.jsonl',
  "PIQA": 'a JSON object with "id", "goal", "sol1" and "sol2", as in valid.jsonl',
  "ARC": 'a JSON object {"id", "question": {"stem", "choices": [{"text", "label"}]}, '
  '"answerKey"}, as in ARC-Easy-Test.jsonl',
}


def _docs_from_records(path: str, kind: str, convert) -> list[MultipleChoiceDoc]:
  """convert(index, record) for each record of a jsonl file; a record that is
  not one of `kind` is a UserError naming the file and the line."""
  docs = []
  for index, (line_number, record) in enumerate(read_jsonl(path, line_numbers=True)):
    try:
      docs.append(convert(index, record))
    except (KeyError, TypeError, AttributeError, IndexError) as e:
      problem = f"no field {e.args[0]!r}" if isinstance(e, KeyError) else " ".join(str(e).split())
      raise UserError(
        f"{path}:{line_number} is not a valid {kind} record ({problem}); expected "
        f"{_RECORD_FIELDS[kind]}"
      ) from e
    except ValueError as e:
      raise UserError(f"{path}:{line_number}: {' '.join(str(e).split())}") from e
  return docs


def read_hellaswag_jsonl(path: str) -> list[MultipleChoiceDoc]:
  return _docs_from_records(
    path, "HellaSwag", lambda i, record: hellaswag_doc(record, doc_id=str(i))
  )


def piqa_labels_path(jsonl_path: str) -> str:
  """valid.jsonl -> valid-labels.lst (the layout of both PIQA downloads)."""
  stem = jsonl_path[: -len(".jsonl")] if jsonl_path.endswith(".jsonl") else jsonl_path
  return stem + "-labels.lst"


def _int_or_none(text: str) -> Optional[int]:
  try:
    return int(text)
  except ValueError:
    return None


def read_piqa(jsonl_path: str, labels_path: Optional[str] = None) -> list[MultipleChoiceDoc]:
  """PIQA jsonl + its labels file (one integer a line); a `label` field in the
  jsonl records is used when there is no labels file."""
  records = read_jsonl(jsonl_path)
  labels_path = labels_path or piqa_labels_path(jsonl_path)
  if os.path.exists(labels_path):
    with open(labels_path, "rb") as f:
      text = decode_utf8(f.read(), labels_path)  # an error naming the file
    labels = []
    for line_number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        if _int_or_none(line) not in (0, 1):
          raise UserError(
            f"{labels_path}:{line_number}: label {line.strip()!r} is not 0 or 1 "
            "(a PIQA labels file holds one 0 or 1 a line)"
          )
        labels.append(line.strip())
    if len(labels) != len(records):
      raise ValueError(
        f"{labels_path} has {len(labels)} labels but {jsonl_path} has {len(records)} questions"
      )
  elif all(isinstance(record, dict) and "label" in record for record in records):
    labels = [record["label"] for record in records]
  else:
    raise FileNotFoundError(
      f"PIQA labels not found: expected {labels_path} next to {jsonl_path} (the test split "
      f"has no public labels). {_PIQA_HELP}"
    )
  return _docs_from_records(
    jsonl_path, "PIQA", lambda i, record: piqa_doc(record, labels[i], doc_id=str(i))
  )


def read_arc_jsonl(path: str) -> list[MultipleChoiceDoc]:
  return _docs_from_records(path, "ARC", lambda i, record: arc_doc(record))


_RAW_READERS = {
  "hellaswag": read_hellaswag_jsonl,
  "piqa": read_piqa,
  "arc_easy": read_arc_jsonl,
  "arc_challenge": read_arc_jsonl,
}


# ---------------------------------------------------------------------------
# TFDS data_dir.


def _import_tfds_builder(name: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if name == "hellaswag":
    # Registers the builder; importing tensorflow_datasets.text as a whole
    # needs TensorFlow.
    import tensorflow_datasets.text.hellaswag  # pylint: disable=g-import-not-at-top,unused-import
  return tfds


def read_tfds(task: str, data_dir: str, split: Optional[str] = None) -> list[MultipleChoiceDoc]:
  """Reads a prepared (array_record) TFDS dataset; never downloads."""
  spec = task_spec(task)
  split = split or spec.split
  tfds = _import_tfds_builder(spec.tfds_name.split("/")[0])
  builder_dir = os.path.join(data_dir, spec.tfds_name.split("/")[0])
  if not os.path.isdir(builder_dir):
    raise FileNotFoundError(
      f"no prepared TFDS dataset {spec.tfds_name!r} under {data_dir} (expected {builder_dir}). "
      + spec.where_to_get
    )
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if not builder.data_path.exists():
      raise FileNotFoundError(
        f"TFDS {spec.tfds_name!r} version {builder.version} is not prepared under {data_dir} "
        f"(expected {builder.data_path}). " + spec.where_to_get
      )
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise RuntimeError(
      f"TFDS {spec.tfds_name!r} under {data_dir} cannot be read without TensorFlow: only "
      "random-access formats (array_record) work here, and it was probably prepared in the "
      "default tfrecord format. Prepare it again with `tfds build "
      f"{spec.tfds_name.split('/')[0]} --file_format=array_record --data_dir=NEW_DIR`, or use "
      f"the raw files. ({e})"
    ) from e
  convert = _TFDS_CONVERTERS[task]
  return [convert(source[i], f"{split}_{i}") for i in range(len(source))]


# ---------------------------------------------------------------------------
# Dispatch.

TFDS_PREFIX = "tfds:"


def find_raw_file(task: str, folder: str) -> Optional[str]:
  for candidate in task_spec(task).raw_candidates:
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  return None


def load_task(
  task: str, path: str, *, split: Optional[str] = None, limit: Optional[int] = None
) -> list[MultipleChoiceDoc]:
  """Docs of `task` from `path`: a raw file, a folder holding one, a TFDS
  data_dir (a folder holding the builder's folder), or "tfds:DIR".

  `split` applies to TFDS only (default: the split lm-evaluation-harness scores); a raw
  file is read whole. `limit` keeps the first N docs.
  """
  spec = task_spec(task)
  if limit is not None and limit <= 0:
    raise ValueError(f"limit must be positive, got {limit}")
  if path.startswith(TFDS_PREFIX):
    docs = read_tfds(task, path[len(TFDS_PREFIX) :], split)
  elif os.path.isfile(path):
    docs = _RAW_READERS[task](path)
  elif os.path.isdir(path):
    raw = find_raw_file(task, path)
    if raw is not None:
      docs = _RAW_READERS[task](raw)
    elif os.path.isdir(os.path.join(path, spec.tfds_name.split("/")[0])):
      docs = read_tfds(task, path, split)
    else:
      raise FileNotFoundError(
        f"no {task} data in {path}: looked for {list(spec.raw_candidates)} and for a TFDS "
        f"folder {spec.tfds_name.split('/')[0]!r}. " + spec.where_to_get
      )
  else:
    raise FileNotFoundError(f"{task} data not found: {path} does not exist. " + spec.where_to_get)
  if not docs:
    raise ValueError(f"{path} holds no {task} docs")
  return docs[:limit] if limit else docs
