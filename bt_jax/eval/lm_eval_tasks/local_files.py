"""Python hooks of the offline lm-evaluation-harness tasks in this folder.

lm-eval loads this file by its path (`!function local_files.NAME` in a task
YAML), so it imports nothing from bt_jax: the folder works when copied
elsewhere. Each hook gives the documents the official task's hook gives, read
from the raw downloads instead of the Hugging Face hub:

- `hellaswag_process_docs`: the prompt and endings of lm-eval's
  tasks/hellaswag/utils.py (EleutherAI/lm-evaluation-harness 0.4.x).
- `piqa_dataset`: PIQA's questions (valid.jsonl) joined with its answers
  (valid-labels.lst, one integer a line), which the authors publish as two
  files; the official task reads a hub copy that holds both.
"""

import os
import re


def _hellaswag_clean(text):
  """Upstream's `preprocess`: strip; " [title]" -> ". "; drop every [...]
  group (WikiHow artifacts); one pass of "  " -> " " (three spaces become two)."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag_doc(doc):
  # str.capitalize also lower-cases the rest of ctx_b, as upstream does.
  context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  return {
    "query": _hellaswag_clean(context),
    "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
    "gold": int(doc["label"]),
  }


def hellaswag_process_docs(dataset):
  """Adds query / choices / gold to raw hellaswag_val.jsonl records."""
  return dataset.map(_hellaswag_doc)


def piqa_dataset(data_files=None, labels_files=None, **unused):
  """custom_dataset hook: {split: jsonl} and {split: labels file} -> a DatasetDict
  whose records carry `label`. Relative paths are relative to the working directory.
  `unused` takes the task metadata lm-eval passes along."""
  import datasets  # pylint: disable=g-import-not-at-top  (lm-eval's own dependency)

  del unused
  if not isinstance(data_files, dict) or not isinstance(labels_files, dict):
    raise ValueError(
      "piqa_local needs dataset_kwargs data_files and labels_files, each "
      "{split: path}, e.g. data_files: {validation: valid.jsonl}, "
      "labels_files: {validation: valid-labels.lst}"
    )
  splits = {}
  for split, path in data_files.items():
    labels_path = labels_files.get(split)
    for name in (path, labels_path):
      if name is None or not os.path.isfile(name):
        raise FileNotFoundError(
          f"PIQA {split} file {name!r} not found (relative to {os.getcwd()}): download "
          "valid.jsonl and valid-labels.lst from https://yonatanbisk.com/piqa/ and run "
          "lm-eval in the folder that holds them, or give full paths in piqa_local.yaml"
        )
    questions = datasets.load_dataset("json", data_files={split: path}, split=split)
    with open(labels_path, encoding="utf-8") as f:
      labels = [int(line) for line in f if line.strip()]
    if len(labels) != len(questions):
      raise ValueError(
        f"{labels_path} has {len(labels)} labels but {path} has {len(questions)} questions"
      )
    if "label" in questions.column_names:
      questions = questions.remove_columns("label")
    splits[split] = questions.add_column("label", labels)
  return datasets.DatasetDict(splits)
