"""Metrics by hand, and the zero-shot evaluator against brute-force scores."""

import json
import math
import os

import numpy as np
import pytest

from bt_jax.eval import tasks
from bt_jax.eval.scoring import LoglikelihoodScorer
from bt_jax.eval.tasks import MultipleChoiceDoc
from bt_jax.eval.zero_shot import (
  doc_requests,
  evaluate_zero_shot,
  format_table,
  mean_stderr,
  parse_task_flags,
  predict,
  run_zero_shot,
  task_metrics,
)
from tests.utils import brute_force_loglikelihood

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_predict_acc_norm_by_characters_and_ties():
  assert predict([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)  # -2 < -1 per character
  assert predict([-1.0, -1.0, -3.0], ["ab", "cd", "e"]) == (0, 0)  # ties: lowest index
  assert predict([-3.0, -2.0, -2.0], ["abc", "de", "fg"]) == (1, 0)  # all -1 per character


def test_mean_stderr():
  values = [1.0, 0.0, 1.0, 1.0]
  mean = 0.75
  sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
  assert mean_stderr(values) == pytest.approx(sample_std / 2)
  assert math.isnan(mean_stderr([1.0]))


def test_task_metrics_by_hand():
  docs = [
    MultipleChoiceDoc("a", "c", ("x", "yyyy"), 1),
    MultipleChoiceDoc("b", "c", ("x", "y"), 0),
    MultipleChoiceDoc("c", "c", ("xx", "y"), 1),
  ]
  lls = [[-1.0, -2.0], [-1.0, -0.5], [-3.0, -2.0]]
  result = task_metrics("t", docs, lls)
  # acc predictions: 0, 1, 1 -> correct 0, 0, 1; norm: [-1,-0.5]->1, [-1,-0.5]->1, [-1.5,-2]->0.
  assert (result.predictions, result.predictions_norm) == ([0, 1, 1], [1, 1, 0])
  assert result.acc == pytest.approx(1 / 3)
  assert result.acc_norm == pytest.approx(1 / 3)
  assert result.acc_stderr == pytest.approx(np.std([0, 0, 1], ddof=1) / math.sqrt(3))


def _fixture_tasks():
  return {name: tasks.load_task(name, FIXTURES) for name in ("hellaswag", "piqa", "arc_easy")}


def test_evaluate_equals_brute_force(model_and_params, tokenizer):
  model, params = model_and_params
  task_docs = _fixture_tasks()
  scorer = LoglikelihoodScorer(model, params, batch_size=4, min_bucket=32, with_greedy=True)
  results = evaluate_zero_shot(model, params, tokenizer, task_docs, scorer=scorer, progress=False)
  for name, docs in task_docs.items():
    expected_lls = [
      [
        brute_force_loglikelihood(model, params, r.context_ids, r.continuation_ids)
        for r in doc_requests(tokenizer, doc)
      ]
      for doc in docs
    ]
    result = results[name]
    for got, expected in zip(result.loglikelihoods, expected_lls, strict=True):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    acc = np.mean([np.argmax(lls) == doc.gold for lls, doc in zip(expected_lls, docs)])
    acc_norm = np.mean(
      [
        np.argmax(np.array(lls) / [len(c) for c in doc.choices]) == doc.gold
        for lls, doc in zip(expected_lls, docs)
      ]
    )
    assert (result.acc, result.acc_norm, result.num_docs) == (acc, acc_norm, len(docs))
  table = format_table(results)
  assert table.splitlines()[2].startswith("hellaswag") and "±" in table


def test_parse_task_flags():
  assert parse_task_flags(["hellaswag=/a.jsonl", "piqa"], data="/d") == {
    "hellaswag": "/a.jsonl",
    "piqa": "/d",
  }
  with pytest.raises(ValueError, match="--task piqa=PATH"):
    parse_task_flags(["piqa"])
  with pytest.raises(ValueError, match="unknown task 'lambada'"):
    parse_task_flags(["lambada=/x"])
  with pytest.raises(ValueError, match="given twice"):
    parse_task_flags(["piqa=/x", "piqa=/y"])


def test_run_zero_shot_writes_json(tokenizer, tmp_path, capsys):
  from tests.utils import eval_model

  model, params = eval_model("vanilla")
  out = tmp_path / "res" / "zero_shot.json"
  report = run_zero_shot(
    model,
    params,
    tokenizer,
    parse_task_flags(["arc_easy", "piqa"], data=FIXTURES),
    limit=2,
    batch_size=4,
    out=str(out),
    per_doc=True,
    progress=False,
    metadata={"workdir": "w"},
  )
  assert "arc_easy" in capsys.readouterr().out
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(report))
  assert saved["workdir"] == "w" and saved["model_kind"] == "vanilla"
  assert saved["results"]["piqa"]["num_docs"] == 2
  assert len(saved["per_doc"]["arc_easy"]["loglikelihoods"][0]) == 4
