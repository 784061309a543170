"""Pieces several test modules share (one definition each): the tiny models
(built from `gin_configs/models/*_tiny.gin`), the tiny training run, the eval
tests' tokenizer texts and brute-force scorer, and workdir snapshots."""

from __future__ import annotations

import dataclasses
import functools
import os

import gin
import jax
import numpy as np

from bt_jax import gin_utils
from bt_jax.config import BlockConfig
from bt_jax.models import build_model, init_params

# ---------------------------------------------------------------------------
# Tiny models.

TINY_GIN_FILES = {"vanilla": "models/vanilla_tiny.gin", "block": "models/block_b4_tiny.gin"}


@functools.cache
def _tiny_gin_config(kind: str):
  if kind not in TINY_GIN_FILES:
    raise ValueError(f"kind={kind!r}: expected one of {sorted(TINY_GIN_FILES)}")
  try:
    return gin_utils.model_config_from_gin([TINY_GIN_FILES[kind]])
  finally:
    gin.clear_config()  # unlocked again: modules imported later may still register configurables


def tiny_config(kind: str, **overrides):
  """The config of `gin_configs/models/{vanilla,block_b4}_tiny.gin` (kind "vanilla"
  or "block"), with `overrides` replaced: every test's tiny model starts here."""
  return dataclasses.replace(_tiny_gin_config(kind), **overrides)


_MODELS: dict = {}


def tiny_model(kind: str, *, seed: int = 0, **overrides):
  """(model, params) of `tiny_config(kind, **overrides)` initialised from
  `jax.random.key(seed)`, built once per session for each argument set."""
  key = (kind, seed, tuple(sorted(overrides.items())))
  if key not in _MODELS:
    model = build_model(tiny_config(kind, **overrides))
    _MODELS[key] = (model, init_params(model, jax.random.key(seed)))
  return _MODELS[key]


# ---------------------------------------------------------------------------
# Evaluation: the tokenizer texts and the brute-force scorer every eval test
# compares against.

VOCAB_SIZE = 300
MAX_LEN = 64

TOKENIZER_TEXTS = [
  "Question: How do you open a jar?\nAnswer: Twist the lid.",
  "A man is sitting on a roof. He starts pulling up roofing on a roof.",
  "The quick brown fox jumps over the lazy dog. Then, the dog sleeps.",
  "Which of these is a mammal? A whale, a shark, a trout or a frog.",
  "Roof shingle removal: A man is sitting on a roof. He is using wrap to wrap a pair of skis.",
]


def eval_model(kind: str):
  """(model, params) of the eval tests' tiny `kind` model ("vanilla", or "block"
  with L_B = 4): the tiny gin config on the eval tokenizer's vocabulary and
  MAX_LEN. A large init std makes the distributions peaked, so argmaxes are
  not near-ties."""
  return tiny_model(kind, vocab_size=VOCAB_SIZE, max_len=MAX_LEN, init_std=0.3)


_APPLY = {}


def _apply(model):
  if model not in _APPLY:
    _APPLY[model] = jax.jit(model.apply)
  return _APPLY[model]


def brute_force_rows(model, params, tokens, exact_length=False):
  """Log-softmax rows [len(tokens), vocab] of one full forward: row t predicts
  tokens[t + 1] (the last row predicts the next token).

  Block models by hand: prepend L-1 pads, append a placeholder
  for the next token, right-pad to a multiple of L; logits[i-1, j] predicts
  aligned position i*L + j, and original position t sits at t + L - 1.

  Unless exact_length, the input is right-padded further to one fixed length so
  that a single shape compiles (causal models: padding after the last real token
  cannot change its rows; the test checks this on a few inputs with exact_length).
  """
  tokens = list(tokens)
  config = model.config
  if isinstance(config, BlockConfig):
    block_len = config.block_len
    inputs = [config.pad_id] * (block_len - 1) + tokens + [config.pad_id]
    inputs += [config.pad_id] * (-len(inputs) % block_len)
    fixed = MAX_LEN + 2 * block_len
  else:
    inputs = tokens
    fixed = MAX_LEN
  if not exact_length:
    assert len(inputs) <= fixed
    inputs = inputs + [config.pad_id] * (fixed - len(inputs))
  logits = _apply(model)({"params": params}, np.asarray([inputs], np.int32))[0]
  if isinstance(config, BlockConfig):
    logits = logits.reshape(-1, logits.shape[-1])  # row r predicts aligned position L + r
  # Block: original t + 1 = aligned t + L, predicted by row t.
  rows = logits[: len(tokens)]
  return np.asarray(jax.nn.log_softmax(rows.astype(np.float32)), np.float64)


def brute_force_logprobs(model, params, tokens, exact_length=False):
  """log p(tokens[t] | tokens[:t]) for t >= 1, [len - 1]."""
  rows = brute_force_rows(model, params, tokens, exact_length)
  return np.array([rows[t - 1, tokens[t]] for t in range(1, len(tokens))])


def brute_force_loglikelihood(model, params, context_ids, continuation_ids, exact_length=False):
  """Sum of log-softmax over the continuation; the input is the last max_len
  tokens of context + continuation."""
  tokens = (list(context_ids) + list(continuation_ids))[-model.config.max_len :]
  start = len(tokens) - len(continuation_ids)
  return float(brute_force_logprobs(model, params, tokens, exact_length)[start - 1 :].sum())


# ---------------------------------------------------------------------------
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


def write_file(directory, text: str, name: str) -> str:
  """Writes `text` to `directory / name` (a pathlib folder); returns the path."""
  path = directory / name
  path.write_text(text)
  return str(path)
