"""The shipped offline lm-eval tasks (bt_jax/eval/lm_eval_tasks): lm-eval loads
them with --include_path from raw files in the working directory, and they give
the prompts, continuations and gold answers of bt_jax.eval.tasks (the harness's
own definitions), on the fixtures plus records that exercise every rule."""

import json
import os
import shutil

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from bt_jax.eval import tasks  # noqa: E402
from bt_jax.eval.lm_eval_adapter import BtJaxLM  # noqa: E402
from bt_jax.eval.zero_shot import evaluate_zero_shot  # noqa: E402
from tests.utils import eval_model  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = {
  "hellaswag": "hellaswag_local",
  "piqa": "piqa_local",
  "arc_easy": "arc_easy_local",
  "arc_challenge": "arc_challenge_local",
}

# Records that exercise HellaSwag's cleanup ([title], [...] groups, one pass of
# double spaces, ctx_b.capitalize() lower-casing the rest), ARC's numeric labels
# and five choices, and PIQA choices with quotes, backslashes and a newline.
_HELLASWAG = {
  "ind": 7,
  "activity_label": "Home and Garden",
  "ctx_a": "[header] How to clean a grill [title] Heat the grill.   [step] Scrub",
  "ctx_b": "THE Grates well.",
  "ctx": "",
  "split": "val",
  "split_type": "indomain",
  "label": 2,
  "endings": [
    "[substeps] wipe   it down.",
    " it [title] Rinse it. ",
    "x [step] y  z",
    "with a \"wire\" brush.",
  ],
  "source_id": "wikihow~1",
}
_ARC_EASY = {
  "id": "num_1",
  "question": {
    "stem": "Pick \"two\" (it's 2).",
    "choices": [
      {"text": "one", "label": "1"},
      {"text": "two", "label": "2"},
      {"text": "three", "label": "3"},
      {"text": "four", "label": "4"},
    ],
  },
  "answerKey": "2",
}
_ARC_CHALLENGE = {
  "id": "five_1",
  "question": {
    "stem": "Which is last?",
    "choices": [{"text": t, "label": l} for t, l in zip(["a", "b", "c", "d", "e"], "ABCDE")],
  },
  "answerKey": "E",
}
_PIQA = {
  "id": "q'1",
  "goal": "Dry a \"wet\" towel\\",
  "sol1": "Hang it\nin the sun.",
  "sol2": "It's 'fine' \\n as is.",
}


def _append(path, record):
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The raw-download layout the YAMLs read, relative to the working directory."""
  folder = tmp_path_factory.mktemp("raw") / "data"
  shutil.copytree(FIXTURES, folder)
  _append(folder / "hellaswag_val.jsonl", _HELLASWAG)
  _append(folder / "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl", _ARC_EASY)
  _append(folder / "ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl", _ARC_CHALLENGE)
  _append(folder / "valid.jsonl", _PIQA)
  with open(folder / "valid-labels.lst", "a", encoding="utf-8") as f:
    f.write("1\n")
  return folder


@pytest.fixture(scope="module")
def task_manager():
  """lm-eval's own tasks and ours (no name clashes), as `--include_path` gives."""
  return TaskManager(include_path=tasks.LM_EVAL_TASKS_DIR)


@pytest.fixture
def offline(task_manager, data_dir, tmp_path, monkeypatch):
  import datasets

  monkeypatch.chdir(data_dir)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
  return task_manager


def _requests_by_doc(task):
  task.build_all_requests(rank=0, world_size=1)
  by_doc = {}
  for instance in task.instances:
    by_doc.setdefault(instance.doc_id, []).append(instance)
  return [sorted(by_doc[i], key=lambda inst: inst.idx) for i in sorted(by_doc)]


def test_shipped_files():
  assert sorted(f for f in os.listdir(tasks.LM_EVAL_TASKS_DIR) if f.endswith(".yaml")) == sorted(
    f"{name}.yaml" for name in NAMES.values()
  )


def test_harness_requests_equal_native_docs(offline, data_dir):
  by_name = offline.load(list(NAMES.values()))["tasks"]
  assert sorted(by_name) == sorted(NAMES.values())
  for ours, theirs in NAMES.items():
    docs = tasks.load_task(ours, str(data_dir))
    requests = _requests_by_doc(by_name[theirs])
    assert len(requests) == len(docs) >= 3, theirs
    for doc, instances, raw in zip(docs, requests, by_name[theirs].eval_docs):
      assert [inst.arguments for inst in instances] == [
        (doc.context, continuation) for continuation in doc.continuations
      ], (theirs, doc)
      assert by_name[theirs].doc_to_target(raw) == doc.gold, (theirs, doc)
  # The edge-case records are the last docs; spot-check the rules by hand too.
  hellaswag = tasks.load_task("hellaswag", str(data_dir))[-1]
  assert (
    hellaswag.context
    == "Home and Garden: How to clean a grill. Heat the grill.  Scrub The grates well."
  )
  # strip comes before the [...] removal, as upstream: a leading space stays.
  assert hellaswag.choices == (" wipe  it down.", "it. Rinse it.", "x y z", 'with a "wire" brush.')


def test_tag_runs_all_four_through_the_harness(offline, data_dir, tokenizer):
  """`--tasks bt_jax_local` with the bt_jax model: the harness's acc / acc_norm and
  every log-likelihood equal the native evaluator's on the same raw files."""
  model, params = eval_model("vanilla")
  lm = BtJaxLM(model=model, params=params, tokenizer=tokenizer, batch_size=4)
  out = lm_eval.simple_evaluate(
    model=lm, tasks=["bt_jax_local"], log_samples=True, task_manager=offline
  )
  task_docs = {ours: tasks.load_task(ours, str(data_dir)) for ours in NAMES}
  native = evaluate_zero_shot(model, params, tokenizer, task_docs, batch_size=4, progress=False)
  for ours, theirs in NAMES.items():
    harness = out["results"][theirs]
    for metric in ("acc", "acc_norm"):
      assert harness[f"{metric},none"] == pytest.approx(getattr(native[ours], metric)), theirs
    samples = sorted(out["samples"][theirs], key=lambda s: s["doc_id"])
    assert len(samples) == len(native[ours].loglikelihoods)
    for sample, lls in zip(samples, native[ours].loglikelihoods):  # 3 to 5 choices
      np.testing.assert_allclose([r[0][0] for r in sample["resps"]], lls, rtol=1e-6)


def test_missing_piqa_labels_named(offline, data_dir, tmp_path, monkeypatch):
  folder = tmp_path / "no_labels"
  folder.mkdir()
  shutil.copy(data_dir / "valid.jsonl", folder)
  monkeypatch.chdir(folder)
  with pytest.raises(FileNotFoundError, match="PIQA validation file 'valid-labels.lst' not found"):
    offline.load(["piqa_local"])
