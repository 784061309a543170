r"""Train a ReDrafter draft head for a trained vanilla run, from gin.

    python -m bt_jax.train_drafter --workdir /tmp/qs_vanilla \
        [--gin_file=runs/drafter.gin] [--gin_param='drafter_train.steps = 1000']

Loads the base run (checkpoint, tokenizer) and trains a draft head by one
of two recipes (`drafter_train.recipe`, see bt_jax/redrafter/train.py):
"distill" (the paper's): `num_prompts` random windows of `prompt_len` tokens
from the corpus's train split, each continued greedily by the base model
for `continuation_len` tokens, the drafter trained on the continuations
only, against the base model's distributions (`distill_loss = "kl"` at
`distill_temperature`) or its greedy tokens ("hard"); "teacher_forcing"
(the released code's): windows of prompt_len + continuation_len tokens of
text, cross-entropy. AdamW, warmup + cosine. `heldout_fraction` of the rows
is held out: top-1 and top-`eval_top_k` accuracy per draft step on them
every `eval_every` steps. The drafter's variant: `recurrence`, `lm_head`,
`exit_ratio`, `num_res_blocks` (bt_jax/redrafter/drafter.py). Every setting is a
field of `drafter_train` (DrafterTrainConfig below;
gin_configs/runs/drafter.gin holds the recipe). Writes `out` (default
WORKDIR/drafter):

    drafter_train.json   the recipe, checked when a rerun resumes
    config.gin           the operative gin config
    distill_data.npz     the distillation texts (made once; a resumed run reuses them)
    checkpoints/<step>/  orbax: drafter params, optimizer state, step (the newest
                         `keep_checkpoints`, every `checkpoint_every` steps)
    metrics.jsonl, tb/   loss and top-1 accuracy per draft step, every step; held-out
                         loss, top-1 and top-k accuracy per draft step
                         (heldout_loss_i, heldout_acc_i, heldout_topk_i) every
                         eval_every steps and at the end
    drafter.json, params/   the trained drafter, written at the end (drafter.json
                         last, atomically: a folder with it is complete)

Rerunning the same command resumes from the newest checkpoint and continues
exactly as an uninterrupted run; SIGTERM checkpoints after the current step
and exits 0 (the summary then has "stopped_at"). Use the drafter with
`python -m bt_jax.generate --workdir WORKDIR --drafter DIR --temperature 0`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

from absl import flags
import gin

from bt_jax import cli
from bt_jax import gin_utils


@dataclasses.dataclass(frozen=True)
class DrafterTrainConfig:
  """The settings of one drafter training run (gin name: drafter_train)."""

  steps: int = 600
  draft_len: int = 4  # C: tokens drafted after g0
  corpus: str = "stdlib"  # bt_jax.data.load_corpus spec; the train split is used
  num_prompts: int = 256  # corpus windows the base model continues
  prompt_len: int = 32  # tokens per window
  continuation_len: int = 64  # greedy tokens the base model adds to each window
  batch_size: int = 32  # sequences per training step
  learning_rate: float = 3e-3  # peak; AdamW, 10% warmup, cosine
  seed: int = 0  # windows, batches and init
  out: Optional[str] = None  # default WORKDIR/drafter
  checkpoint_every: int = 100  # steps between checkpoints (OUT/checkpoints)
  keep_checkpoints: int = 2  # the newest ones kept
  stop_at_step: Optional[int] = None  # checkpoint and stop there (then rerun to resume)
  recipe: str = "distill"  # "distill" (paper) | "teacher_forcing" (released code)
  distill_loss: str = "kl"  # "distill": "kl" (base model's distributions) | "hard"
  distill_temperature: float = 1.0  # of the KL (loss scaled by its square)
  heldout_fraction: float = 0.1  # rows held out for the accuracy per draft step
  eval_every: int = 100  # steps between held-out evaluations (and at the end)
  eval_top_k: int = 4  # k of the held-out top-k accuracy (the beam width)
  recurrence: str = "silu"  # "silu" (released) | "linear" (TensorRT-LLM) | "sum" (rnn=False)
  lm_head: str = "base"  # "base": the base model's frozen head | "own": 2H x V (paper)
  exit_ratio: float = 0.5  # ResBlock width / (2H); 1.0 with lm_head "own" is the paper's
  num_res_blocks: int = 2

  def __post_init__(self):
    for name in (
      "steps",
      "draft_len",
      "num_prompts",
      "prompt_len",
      "continuation_len",
      "batch_size",
      "checkpoint_every",
      "keep_checkpoints",
      "eval_every",
      "eval_top_k",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"drafter_train.{name} must be positive; got {getattr(self, name)}")
    choices = {
      "recipe": ("distill", "teacher_forcing"),
      "distill_loss": ("kl", "hard"),
      "recurrence": ("silu", "linear", "sum"),
      "lm_head": ("base", "own"),
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(
          f"drafter_train.{name} must be one of {allowed}; got {getattr(self, name)!r}"
        )
    for name in ("distill_temperature", "exit_ratio"):
      if not getattr(self, name) > 0:
        raise ValueError(f"drafter_train.{name} must be positive; got {getattr(self, name)}")
    if not 0 < self.heldout_fraction < 1:
      raise ValueError(
        f"drafter_train.heldout_fraction must be in (0, 1); got {self.heldout_fraction}"
      )
    if self.num_res_blocks < 0:
      raise ValueError(f"drafter_train.num_res_blocks must be >= 0; got {self.num_res_blocks}")
    if self.draft_len + 2 > self.prompt_len + self.continuation_len:
      raise ValueError(
        f"drafter_train.draft_len {self.draft_len} leaves no target in rows of "
        f"prompt_len + continuation_len = {self.prompt_len + self.continuation_len}"
        " tokens; it must be at most that minus 2"
      )
    if not self.learning_rate > 0:
      raise ValueError(f"drafter_train.learning_rate must be positive; got {self.learning_rate}")
    if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.steps:
      raise ValueError(
        f"drafter_train.stop_at_step must be in [1, steps={self.steps}]; got {self.stop_at_step}"
      )

  def resume_fields(self) -> dict:
    """The fields a resumed run must share with the one it resumes."""
    skip = ("out", "checkpoint_every", "keep_checkpoints", "stop_at_step")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# Gin at the edge (as bt_jax.train registers `train`): `drafter_train.*` bindings.
GinDrafterTrainConfig = gin.external_configurable(DrafterTrainConfig, "drafter_train")


def config_from_gin(gin_files, gin_params):
  """(DrafterTrainConfig, operative config str) from gin files and bindings."""
  gin_utils.parse_gin(gin_files, gin_params)
  try:
    config = GinDrafterTrainConfig()
  except Exception as e:
    raise ValueError(
      f"invalid drafter_train config from gin files {list(gin_files)} and "
      f"bindings {list(gin_params)}: {e}"
    ) from e
  return config, gin.operative_config_str()


RECIPE_FILE = "drafter_train.json"


def _check_resumable(out: str, cfg: DrafterTrainConfig, base_workdir: str) -> None:
  """A rerun into an OUT that already has a run's checkpoints resumes it: the
  recipe (and the base model) must be the same; else an error naming what
  differs. Records the recipe for a fresh run."""
  # pylint: disable=import-outside-toplevel
  from bt_jax import checkpointing
  from bt_jax.redrafter.train import DISTILL_DATA_FILE

  # pylint: enable=import-outside-toplevel
  path = os.path.join(out, RECIPE_FILE)
  data = os.path.join(out, DISTILL_DATA_FILE)
  want = {**cfg.resume_fields(), "base_workdir": os.path.abspath(base_workdir)}
  started = os.path.isdir(checkpointing.checkpoint_dir(out)) or os.path.isfile(data)
  if os.path.isfile(path) and started:
    with open(path, encoding="utf-8") as f:
      have = json.load(f)
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if differ:
      raise ValueError(
        f"{out} holds a drafter run with another recipe, which this run would resume: "
        + ", ".join(f"{k} {have.get(k)!r} there, {want.get(k)!r} now" for k in differ)
        + "; pass another drafter_train.out or delete the directory"
      )
  elif os.path.isdir(checkpointing.checkpoint_dir(out)):
    raise ValueError(
      f"{out} holds drafter checkpoints but no {RECIPE_FILE} to check them "
      "against; pass another drafter_train.out or delete the directory"
    )
  else:
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(data):  # texts of an unknown recipe: made again
      os.remove(data)
    checkpointing.write_text_atomic(path, json.dumps(want, indent=2, sort_keys=True))


def train(workdir: str, cfg: DrafterTrainConfig, operative_config: str = "") -> dict:
  """Trains (or resumes) and saves the draft head; returns the summary the
  binary prints (with "stopped_at" when SIGTERM or stop_at_step stopped it
  after a checkpoint; rerun the same command to resume)."""
  # pylint: disable=import-outside-toplevel
  from bt_jax import checkpointing, run_utils
  from bt_jax.data import load_corpus
  from bt_jax.models.vanilla import VanillaLM
  from bt_jax.redrafter import distill_drafter, save_drafter
  from bt_jax.redrafter.train import Objective

  # pylint: enable=import-outside-toplevel
  out = os.path.abspath(cfg.out or os.path.join(workdir, "drafter"))
  with run_utils.StopRequest() as stop_request:  # from the start: SIGTERM while distilling too
    model, params, tokenizer = checkpointing.load_for_inference(workdir)
    if not isinstance(model, VanillaLM):
      raise ValueError(
        f"{workdir} holds a {model.config.kind} model; the draft head drafts for "
        "a vanilla base model"
      )
    _check_resumable(out, cfg, workdir)
    if operative_config:
      checkpointing.write_text_atomic(os.path.join(out, "config.gin"), operative_config)
    writer = run_utils.MetricWriter(out, _latest_step(out), enabled=True)
    try:
      drafter, result = distill_drafter(
        model,
        params,
        tokenizer,
        load_corpus(cfg.corpus, "train"),
        draft_len=cfg.draft_len,
        num_prompts=cfg.num_prompts,
        prompt_len=cfg.prompt_len,
        continuation_len=cfg.continuation_len,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        run_dir=out,
        recipe=cfg.recipe,
        objective=Objective(
          loss=cfg.distill_loss if cfg.recipe == "distill" else "hard",
          temperature=cfg.distill_temperature,
          top_k=cfg.eval_top_k,
        ),
        heldout_fraction=cfg.heldout_fraction,
        eval_every=cfg.eval_every,
        drafter_options=dict(
          recurrence=cfg.recurrence,
          lm_head=cfg.lm_head,
          exit_ratio=cfg.exit_ratio,
          num_res_blocks=cfg.num_res_blocks,
        ),
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        stop_at_step=cfg.stop_at_step,
        stop_request=stop_request,
        metrics_writer=writer,
      )
    finally:
      writer.close()
  last = _last_record(out)
  summary = {
    "out": out,
    "resumed_from": result.start_step,
    "step": last["step"],
    "final_loss": last["loss"],
    "final_acc_i": last["acc_i"],
  }
  for key in ("heldout_acc_i", "heldout_topk_i"):
    if key in last:
      summary[key] = last[key]
  if result.stopped_at is not None:
    return {**summary, "stopped_at": result.stopped_at}
  save_drafter(
    out,
    drafter,
    result.params,
    metadata={
      "base_workdir": os.path.abspath(workdir),
      **dataclasses.asdict(cfg),
      "out": out,
      "final_loss": last["loss"],
      "final_acc_i": last["acc_i"],
    },
    base_config=model.config,
  )
  return summary


def _latest_step(out: str) -> int:
  """The newest checkpointed step in OUT (0 for none)."""
  from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(checkpointing.checkpoint_dir(out)):
    return 0
  checkpointer = checkpointing.Checkpointer(out, read_only=True, async_save=False)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def _last_record(out: str) -> dict:
  from bt_jax import run_utils  # pylint: disable=import-outside-toplevel

  with open(os.path.join(out, run_utils.METRICS_FILE), encoding="utf-8") as f:
    return json.loads(f.read().splitlines()[-1])


def define_flags() -> None:
  """Defined only when run as a program (the --workdir of other binaries)."""
  flags.DEFINE_string("workdir", None, "Trained vanilla run (the base model).")
  flags.DEFINE_multi_string("gin_file", [], "Gin files (gin_configs/ is on the search path).")
  flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'drafter_train.steps = 100'.")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise cli.UserError("--workdir is required")
  try:
    cfg, operative = config_from_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_param)
    summary = train(workdir, cfg, operative)
  except (FileNotFoundError, ValueError) as e:  # one line, exit status 2 (bt_jax.cli)
    raise cli.UserError(str(e)) from e
  print(json.dumps(summary))


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_orbax_logs()
  define_flags()
  cli.run(lambda _: main([sys.argv[0]]))  # --help exits 0; stray arguments are user errors
