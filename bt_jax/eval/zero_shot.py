"""Zero-shot multiple-choice evaluation: acc, acc_norm and their stderr.

    docs = {"hellaswag": load_task("hellaswag", "/data/hellaswag_val.jsonl")}
    results = evaluate_zero_shot(model, params, tokenizer, docs, batch_size=32)
    print(format_table(results))

Metrics as in lm-evaluation-harness 0.4.x (spec zero_shot.md): acc takes the
argmax of the choices' log-likelihoods, acc_norm the argmax of log-likelihood
divided by the choice's length in characters (without the leading space); ties
go to the lowest index; stderr is the sample standard deviation over sqrt(n).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np
from jax.sharding import Mesh

from bt_jax.eval.sharding import EvalSharding
from bt_jax.eval.scoring import LoglikelihoodScorer, ScoreRequest, TokenizerLike, encode_pair
from bt_jax.eval.tasks import MultipleChoiceDoc, load_task, task_spec


@dataclasses.dataclass
class TaskResult:
  task: str
  num_docs: int
  acc: float
  acc_stderr: float
  acc_norm: float
  acc_norm_stderr: float
  # Per doc: the log-likelihood of every choice, and the two predictions.
  loglikelihoods: list[list[float]]
  predictions: list[int]
  predictions_norm: list[int]

  def summary(self) -> dict[str, Any]:
    return {
      "num_docs": self.num_docs,
      "acc": self.acc,
      "acc_stderr": self.acc_stderr,
      "acc_norm": self.acc_norm,
      "acc_norm_stderr": self.acc_norm_stderr,
    }


def mean_stderr(values: Sequence[float]) -> float:
  """Sample standard deviation / sqrt(n), the harness's stderr of a mean."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return math.nan
  return float(np.std(values, ddof=1) / math.sqrt(values.size))


def predict(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
  """(argmax of log-likelihoods, argmax of log-likelihood per character);
  np.argmax takes the lowest index on ties."""
  lls = np.asarray(loglikelihoods, np.float64)
  lengths = np.asarray([float(len(choice)) for choice in choices])
  return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def doc_requests(tokenizer: TokenizerLike, doc: MultipleChoiceDoc) -> list[ScoreRequest]:
  return [encode_pair(tokenizer, doc.context, continuation) for continuation in doc.continuations]


def task_metrics(
  task: str, docs: Sequence[MultipleChoiceDoc], loglikelihoods: Sequence[Sequence[float]]
) -> TaskResult:
  predictions, predictions_norm, correct, correct_norm = [], [], [], []
  for doc, lls in zip(docs, loglikelihoods, strict=True):
    pred, pred_norm = predict(lls, doc.choices)
    predictions.append(pred)
    predictions_norm.append(pred_norm)
    correct.append(float(pred == doc.gold))
    correct_norm.append(float(pred_norm == doc.gold))
  return TaskResult(
    task=task,
    num_docs=len(docs),
    acc=float(np.mean(correct)),
    acc_stderr=mean_stderr(correct),
    acc_norm=float(np.mean(correct_norm)),
    acc_norm_stderr=mean_stderr(correct_norm),
    loglikelihoods=[[float(x) for x in lls] for lls in loglikelihoods],
    predictions=predictions,
    predictions_norm=predictions_norm,
  )


def evaluate_zero_shot(
  model: nn.Module,
  params: Any,
  tokenizer: TokenizerLike,
  tasks: Mapping[str, Sequence[MultipleChoiceDoc]],
  *,
  batch_size: int = 32,
  max_batch_tokens: Optional[int] = None,
  min_bucket: int = 32,
  progress: bool = True,
  scorer: Optional[LoglikelihoodScorer] = None,
  sharding: Optional[EvalSharding] = None,
  mesh: Optional[Mesh] = None,
) -> dict[str, TaskResult]:
  """Scores every choice of every doc of every task in one pass of batches
  (over `mesh`, or the mesh of `sharding`, when given; see `LoglikelihoodScorer`)."""
  scorer = scorer or LoglikelihoodScorer(
    model,
    params,
    batch_size=batch_size,
    max_batch_tokens=max_batch_tokens,
    min_bucket=min_bucket,
    sharding=sharding,
    mesh=mesh,
  )
  requests: list[ScoreRequest] = []
  spans = {}  # task -> [(start, end) of each doc's requests]
  for task, docs in tasks.items():
    spans[task] = []
    for doc in docs:
      start = len(requests)
      requests += doc_requests(tokenizer, doc)
      spans[task].append((start, len(requests)))
  loglikelihoods, _ = scorer(requests, progress=progress, desc="zero-shot " + "+".join(tasks))
  return {
    task: task_metrics(task, docs, [loglikelihoods[a:b] for a, b in spans[task]])
    for task, docs in tasks.items()
  }


def format_table(results: Mapping[str, TaskResult]) -> str:
  """A plain-text table of acc and acc_norm (percent) +- stderr."""
  header = f"{'task':<15} {'docs':>6} {'acc':>16} {'acc_norm':>16}"
  lines = [header, "-" * len(header)]
  for task, result in results.items():
    acc = f"{100 * result.acc:.2f} ± {100 * result.acc_stderr:.2f}"
    acc_norm = f"{100 * result.acc_norm:.2f} ± {100 * result.acc_norm_stderr:.2f}"
    lines.append(f"{task:<15} {result.num_docs:>6} {acc:>16} {acc_norm:>16}")
  return "\n".join(lines)


def results_to_json(
  results: Mapping[str, TaskResult], *, per_doc: bool = False, **metadata: Any
) -> dict[str, Any]:
  out: dict[str, Any] = dict(metadata)
  out["results"] = {task: result.summary() for task, result in results.items()}
  if per_doc:
    out["per_doc"] = {
      task: {
        "loglikelihoods": r.loglikelihoods,
        "predictions": r.predictions,
        "predictions_norm": r.predictions_norm,
      }
      for task, r in results.items()
    }
  return out


def parse_task_flags(task_flags: Sequence[str], data: Optional[str] = None) -> dict[str, str]:
  """["hellaswag=/d/hellaswag_val.jsonl", "piqa"] -> {task: path}; a task
  without "=PATH" reads from the folder `data`."""
  task_paths: dict[str, str] = {}
  for flag in task_flags:
    name, sep, path = flag.partition("=")
    name = name.strip()
    task_spec(name)
    if not sep:
      if not data:
        raise ValueError(
          f"task {name!r} has no data path: write --task {name}=PATH or give "
          "--data FOLDER holding its files"
        )
      path = data
    if name in task_paths:
      raise ValueError(f"task {name!r} is given twice")
    task_paths[name] = path
  if not task_paths:
    raise ValueError("no task given; valid tasks are hellaswag, piqa, arc_easy, arc_challenge")
  return task_paths


def load_tasks(
  task_paths: Mapping[str, str], *, split: Optional[str] = None, limit: Optional[int] = None
) -> dict[str, list]:
  """{task: docs} of every task, read before any model is loaded so that a bad
  path or file is reported at once."""
  return {
    name: load_task(name, path, split=split, limit=limit) for name, path in task_paths.items()
  }


def run_zero_shot(
  model: nn.Module,
  params: Any,
  tokenizer: TokenizerLike,
  task_paths: Mapping[str, str],
  *,
  limit: Optional[int] = None,
  split: Optional[str] = None,
  batch_size: int = 32,
  max_batch_tokens: Optional[int] = None,
  out: Optional[str] = None,
  per_doc: bool = False,
  progress: bool = True,
  metadata: Optional[Mapping[str, Any]] = None,
  sharding: Optional[EvalSharding] = None,
  mesh: Optional[Mesh] = None,
  tasks: Optional[Mapping[str, Sequence[Any]]] = None,
) -> dict[str, Any]:
  """Loads the tasks (unless given, as `load_tasks` returns them), scores
  them, prints the table and writes the JSON."""
  if tasks is None:
    tasks = load_tasks(task_paths, split=split, limit=limit)
  results = evaluate_zero_shot(
    model,
    params,
    tokenizer,
    tasks,
    batch_size=batch_size,
    max_batch_tokens=max_batch_tokens,
    progress=progress,
    sharding=sharding,
    mesh=mesh,
  )
  print(format_table(results))
  report = results_to_json(
    results,
    per_doc=per_doc,
    **dict(metadata or {}),
    model_kind=model.config.kind,
    context_len=model.config.max_len,
    data=dict(task_paths),
    limit=limit,
  )
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report
