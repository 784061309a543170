"""Evaluation: zero-shot multiple choice, perplexity by position, lm-eval adapter.

The lm-evaluation-harness adapter (`bt_jax.eval.lm_eval_adapter`) is not
imported here: lm-eval is an optional dependency.
"""

from bt_jax.eval.perplexity import (
  PositionLoss,
  loss_by_position,
  plot_loss_by_position,
  read_corpus,
)
from bt_jax.eval.scoring import LoglikelihoodScorer, ScoreRequest, encode_pair
from bt_jax.eval.tasks import TASKS, MultipleChoiceDoc, load_task
from bt_jax.eval.zero_shot import TaskResult, evaluate_zero_shot, format_table, results_to_json

__all__ = [
  "TASKS",
  "LoglikelihoodScorer",
  "MultipleChoiceDoc",
  "PositionLoss",
  "ScoreRequest",
  "TaskResult",
  "encode_pair",
  "evaluate_zero_shot",
  "format_table",
  "load_task",
  "loss_by_position",
  "plot_loss_by_position",
  "read_corpus",
  "results_to_json",
]
