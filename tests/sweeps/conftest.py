"""Shared pieces of the sweep tests: a tiny run (a few steps of a 1 x 64 block model)."""

from __future__ import annotations

import pytest

TINY_RUN_GIN = """
include 'models/block_b4_tiny.gin'
BlockConfig.max_len = 64
BlockConfig.block_layers = 1      # one layer per stack: a quick compile
BlockConfig.token_layers = 1

data.corpus = "stdlib"
data.corpus_max_bytes = 150000
data.validation_max_bytes = 30000
train.seq_len = 64
train.batch_size = 4
train.steps = 6
optimizer.warmup_steps = 2
optimizer.learning_rate = 1e-3
train.log_every = 1
train.eval_every = 3
train.eval_batches = 2
checkpoint.every = 3
checkpoint.keep = 5
train.progress_bar = False
"""


@pytest.fixture(scope="session")
def tiny_run_gin(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("sweep_gin") / "tiny_run.gin"
  path.write_text(TINY_RUN_GIN)
  return str(path)


def write_sweep(directory, text: str, name: str = "sweep.gin") -> str:
  path = directory / name
  path.write_text(text)
  return str(path)
