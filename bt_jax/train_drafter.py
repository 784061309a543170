r"""Train a ReDrafter draft head for a trained vanilla run (distillation), from gin.

    python -m bt_jax.train_drafter --workdir /tmp/qs_vanilla \
        [--gin_file=runs/drafter.gin] [--gin_param='drafter_train.steps = 1000']

Loads the base run (checkpoint, tokenizer), takes `num_prompts` random
windows of `prompt_len` tokens from the corpus's train split, lets the base
model continue each greedily for `continuation_len` tokens, and trains the
draft head on those texts by teacher forcing (the paper's distillation
recipe; AdamW, warmup + cosine). Every setting is a field of
`drafter_train` (DrafterTrainConfig below; gin_configs/runs/drafter.gin holds
the recipe). Writes `out` (default WORKDIR/drafter): drafter.json, params/,
config.gin (the operative config) and metrics.jsonl (loss and top-1 accuracy
per draft step, every step). Use it with
`python -m bt_jax.generate --workdir WORKDIR --drafter DIR --temperature 0`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

from absl import app, flags
import gin

from bt_jax import gin_utils


@dataclasses.dataclass(frozen=True)
class DrafterTrainConfig:
  """The settings of one drafter training run (gin name: drafter_train)."""

  steps: int = 600
  draft_len: int = 4               # C: tokens drafted after g0
  corpus: str = "stdlib"           # bt_jax.data.load_corpus spec; the train split is used
  num_prompts: int = 256           # corpus windows the base model continues
  prompt_len: int = 32             # tokens per window
  continuation_len: int = 64       # greedy tokens the base model adds to each window
  batch_size: int = 32             # sequences per training step
  learning_rate: float = 3e-3      # peak; AdamW, 10% warmup, cosine
  seed: int = 0                    # windows, batches and init
  out: Optional[str] = None        # default WORKDIR/drafter

  def __post_init__(self):
    for name in ("steps", "draft_len", "num_prompts", "prompt_len", "continuation_len",
                 "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"drafter_train.{name} must be positive; got {getattr(self, name)}")
    if not self.learning_rate > 0:
      raise ValueError(f"drafter_train.learning_rate must be positive; got {self.learning_rate}")


# Gin at the edge (as bt_jax.train registers `train`): `drafter_train.*` bindings.
GinDrafterTrainConfig = gin.external_configurable(DrafterTrainConfig, "drafter_train")


def config_from_gin(gin_files, gin_params):
  """(DrafterTrainConfig, operative config str) from gin files and bindings."""
  gin_utils.parse_gin(gin_files, gin_params)
  try:
    config = GinDrafterTrainConfig()
  except Exception as e:
    raise ValueError(f"invalid drafter_train config from gin files {list(gin_files)} and "
                     f"bindings {list(gin_params)}: {e}") from e
  return config, gin.operative_config_str()


def train(workdir: str, cfg: DrafterTrainConfig, operative_config: str = "") -> dict:
  """Trains and saves the draft head; returns the summary printed by the binary."""
  # pylint: disable=import-outside-toplevel
  from bt_jax import checkpointing
  from bt_jax.data import load_corpus
  from bt_jax.models.vanilla import VanillaLM
  from bt_jax.redrafter import distill_drafter, save_drafter
  # pylint: enable=import-outside-toplevel
  model, params, tokenizer = checkpointing.load_for_inference(workdir)
  if not isinstance(model, VanillaLM):
    raise ValueError(f"{workdir} holds a {model.config.kind} model; the draft head drafts for "
                     "a vanilla base model")
  drafter, drafter_params, history = distill_drafter(
      model, params, tokenizer, load_corpus(cfg.corpus, "train"), draft_len=cfg.draft_len,
      num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len,
      continuation_len=cfg.continuation_len, batch_size=cfg.batch_size, steps=cfg.steps,
      learning_rate=cfg.learning_rate, seed=cfg.seed)
  out = cfg.out or os.path.join(workdir, "drafter")
  save_drafter(out, drafter, drafter_params, metadata={
      "base_workdir": os.path.abspath(workdir), **dataclasses.asdict(cfg), "out": out,
      "final_loss": history[-1]["loss"], "final_acc_i": history[-1]["acc_i"]})
  checkpointing.write_text_atomic(os.path.join(out, "metrics.jsonl"),
                                  "".join(json.dumps(r) + "\n" for r in history))
  if operative_config:
    checkpointing.write_text_atomic(os.path.join(out, "config.gin"), operative_config)
  return {"out": out, "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
          "final_acc_i": history[-1]["acc_i"]}


def define_flags() -> None:
  """Defined only when run as a program (the --workdir of other binaries)."""
  flags.DEFINE_string("workdir", None, "Trained vanilla run (the base model).")
  flags.DEFINE_multi_string("gin_file", [], "Gin files (gin_configs/ is on the search path).")
  flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'drafter_train.steps = 100'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError("--workdir is required")
  try:
    cfg, operative = config_from_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_param)
    summary = train(workdir, cfg, operative)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top
  logging_utils.quiet_orbax_logs()
  define_flags()
  app.run(main)
