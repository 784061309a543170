"""Shared fixtures: a tiny trained tokenizer, tiny vanilla and block models, and
the brute-force scorer every test compares against."""

import jax
import numpy as np
import pytest

from bt_jax.config import BlockConfig, VanillaConfig
from bt_jax.data.tokenizer import train_bpe
from bt_jax.models import build_model, init_params

VOCAB_SIZE = 300
MAX_LEN = 64

TOKENIZER_TEXTS = [
    "Question: How do you open a jar?\nAnswer: Twist the lid.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "The quick brown fox jumps over the lazy dog. Then, the dog sleeps.",
    "Which of these is a mammal? A whale, a shark, a trout or a frog.",
    "Roof shingle removal: A man is sitting on a roof. He is using wrap to wrap a pair of skis.",
]


@pytest.fixture(scope="session")
def tokenizer():
  return train_bpe(TOKENIZER_TEXTS * 4, vocab_size=VOCAB_SIZE)


# A large init std makes the distributions peaked, so argmaxes are not near-ties.
_CONFIGS = {
    "vanilla": VanillaConfig(vocab_size=VOCAB_SIZE, num_layers=2, width=64, max_len=MAX_LEN,
                             init_std=0.3),
    "block": BlockConfig(vocab_size=VOCAB_SIZE, block_len=4, block_layers=2, block_width=64,
                         token_layers=2, token_width=64, max_len=MAX_LEN, init_std=0.3),
}


_MODELS = {}


def tiny_model(kind):
  """(model, params) of a tiny `kind` model, built once per session."""
  if kind not in _MODELS:
    model = build_model(_CONFIGS[kind])
    _MODELS[kind] = (model, init_params(model, jax.random.key(0)))
  return _MODELS[kind]


@pytest.fixture(scope="session", params=["vanilla", "block"])
def model_and_params(request):
  return tiny_model(request.param)


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
  rows = logits[:len(tokens)]
  return np.asarray(jax.nn.log_softmax(rows.astype(np.float32)), np.float64)


def brute_force_logprobs(model, params, tokens, exact_length=False):
  """log p(tokens[t] | tokens[:t]) for t >= 1, [len - 1]."""
  rows = brute_force_rows(model, params, tokens, exact_length)
  return np.array([rows[t - 1, tokens[t]] for t in range(1, len(tokens))])


def brute_force_loglikelihood(model, params, context_ids, continuation_ids, exact_length=False):
  """Sum of log-softmax over the continuation; the input is the last max_len
  tokens of context + continuation."""
  tokens = (list(context_ids) + list(continuation_ids))[-model.config.max_len:]
  start = len(tokens) - len(continuation_ids)
  return float(brute_force_logprobs(model, params, tokens, exact_length)[start - 1:].sum())
