r"""Train a ReDrafter draft head for a trained vanilla run (distillation).

    python -m bt_jax.train_drafter --workdir /tmp/qs_vanilla [--out DIR] \
        [--steps 600] [--draft_len 4] [--corpus stdlib] [--num_prompts 256]

Loads the base run (checkpoint, tokenizer), takes --num_prompts random
windows of --prompt_len tokens from the corpus's train split, lets the base
model continue each greedily for --continuation_len tokens, and trains the
draft head on those texts by teacher forcing (the paper's distillation
recipe; AdamW, warmup + cosine). Writes DIR (default WORKDIR/drafter):
drafter.json, params/ and metrics.jsonl (loss and top-1 accuracy per draft
step, every step). Use it with
`python -m bt_jax.generate --workdir WORKDIR --drafter DIR --temperature 0`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained vanilla run (the base model).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/drafter).")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps.")
_DRAFT_LEN = flags.DEFINE_integer("draft_len", 4, "Tokens drafted after g0 (C).")
_CORPUS = flags.DEFINE_string("corpus", "stdlib", "stdlib | files:<glob> | tfds:<name> "
                              "(bt_jax.data.load_corpus); the train split is used.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 256, "Corpus windows to continue.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Tokens per window.")
_CONTINUATION_LEN = flags.DEFINE_integer("continuation_len", 64,
                                         "Greedy tokens the base model adds to each window.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sequences per training step.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the windows, the batches and the init.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  import numpy as np  # pylint: disable=import-outside-toplevel

  # pylint: disable=import-outside-toplevel
  from bt_jax import checkpointing
  from bt_jax.data import load_corpus
  from bt_jax.models.vanilla import VanillaLM
  from bt_jax.redrafter import (DraftHead, DrafterConfig, corpus_windows,
                                distillation_batches, save_drafter, train_drafter)
  # pylint: enable=import-outside-toplevel
  try:
    model, params, tokenizer = checkpointing.load_for_inference(_WORKDIR.value)
    if not isinstance(model, VanillaLM):
      raise ValueError(f"{_WORKDIR.value} holds a {model.config.kind} model; the draft head "
                       "drafts for a vanilla base model")
    drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=_DRAFT_LEN.value))
    rng = np.random.default_rng(_SEED.value)
    prompts = corpus_windows(tokenizer, load_corpus(_CORPUS.value, "train"),
                             _NUM_PROMPTS.value, _PROMPT_LEN.value, rng)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  batches = distillation_batches(model, params, prompts,
                                 continuation_len=_CONTINUATION_LEN.value,
                                 batch_size=_BATCH_SIZE.value, seed=_SEED.value,
                                 eos_id=tokenizer.eos_id)
  drafter_params, history = train_drafter(model, params, drafter, batches,
                                          steps=_STEPS.value,
                                          learning_rate=_LEARNING_RATE.value, seed=_SEED.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "drafter")
  save_drafter(out, drafter, drafter_params, metadata={
      "base_workdir": os.path.abspath(_WORKDIR.value), "steps": _STEPS.value,
      "corpus": _CORPUS.value, "num_prompts": _NUM_PROMPTS.value,
      "prompt_len": _PROMPT_LEN.value, "continuation_len": _CONTINUATION_LEN.value,
      "final_loss": history[-1]["loss"], "final_acc_i": history[-1]["acc_i"]})
  checkpointing.write_text_atomic(os.path.join(out, "metrics.jsonl"),
                                  "".join(json.dumps(r) + "\n" for r in history))
  print(json.dumps({"out": out, "first_loss": history[0]["loss"],
                    "final_loss": history[-1]["loss"], "final_acc_i": history[-1]["acc_i"]}))


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top
  logging_utils.quiet_orbax_logs()
  app.run(main)
