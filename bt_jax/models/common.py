"""Checks shared by the models."""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_token_ids(tokens, vocab_size: int) -> None:
  """Raises for ids outside [0, vocab_size) when the values are known (not under jit)."""
  if not is_concrete(tokens):
    return
  arr = np.asarray(tokens)
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    bad = int(arr.max()) if arr.max() >= vocab_size else int(arr.min())
    raise ValueError(f"token id {bad} is outside the vocabulary; valid ids are 0..{vocab_size - 1}")
