"""Wall-clock timing of a jitted call, shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Sequence


def time_call(fn: Callable, args: Sequence, warmup: int, repeats: int) -> Dict[str, float]:
  """Median and minimum milliseconds of `fn(*args)` over `repeats` timed calls,
  after `warmup` untimed ones (compilation lands there); each call is waited
  for with `jax.block_until_ready`."""
  import jax  # pylint: disable=import-outside-toplevel  (callers may set XLA_FLAGS first)

  if repeats < 1:
    raise ValueError(f"repeats must be >= 1; got {repeats}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times))
