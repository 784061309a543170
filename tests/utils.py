"""Pieces several test modules share (one definition each)."""

from __future__ import annotations

import os

# A tiny training run for the real `bt_jax.train` binary: 6 steps of a block
# model with one layer per stack (a quick compile), evals at 3 and 6,
# checkpoints at 3 and 6.
TINY_SEQ_LEN = 64
TINY_BATCH = 4
TINY_STEPS = 6
TINY_RUN_GIN = f"""
include 'models/block_b4_tiny.gin'
BlockConfig.max_len = {TINY_SEQ_LEN}
BlockConfig.block_layers = 1      # one layer per stack: a quick compile
BlockConfig.token_layers = 1

data.corpus = "stdlib"
data.corpus_max_bytes = 150000
data.validation_max_bytes = 30000
train.seq_len = {TINY_SEQ_LEN}
train.batch_size = {TINY_BATCH}
train.steps = {TINY_STEPS}
optimizer.warmup_steps = 2
optimizer.learning_rate = 1e-3
train.log_every = 1
train.eval_every = 3
train.eval_batches = 2
checkpoint.every = 3
checkpoint.keep = 5
train.progress_bar = False
"""


def snapshot(path) -> dict[str, bytes]:
  """Every file under `path` with its bytes: equal snapshots mean nothing changed."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out
