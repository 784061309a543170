"""Where a generate call spends its time, op by op, on both sides of a benchmark.

`jax_op_profile` traces one call of a jitted function with `jax.profiler`
and reads the trace back (`jax.profiler.ProfileData`): every event on XLA's
compute threads is matched to the HLO instruction of the compiled program
(its name) and grouped by the instruction's source `op_name` metadata (the
Flax module path and the jnp primitive, e.g.
`VanillaLM.decode/decoder/layer_N/mlp/wi/dot_general`; layer numbers folded
into `layer_N` so the layers add up). `torch_op_profile` does the same for a
PyTorch call with `torch.profiler`, grouped by operator (self time; with
`torch.compile` the compiled graph's own fused kernels appear as its
`CompiledFxGraph` entry). Both return rows of {op, ms, share, calls}, the
largest first, shares of the summed op time (threads add up, so on 2 cores
the sum can exceed the wall time).

Used by `experiments.peer_bench --profile` to say what bounds each side.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

# Executor bookkeeping: events that contain the op events (counted twice
# otherwise), thread-pool markers and a thread's waits for the others.
_NOT_OPS = ("ThunkExecutor::", "ThreadpoolListener::", "end: ", "SlinkyThreadPool::Await")
# XLA:CPU runs a program's ops on the client's thread and its Eigen pool.
_COMPUTE_THREADS = ("XLAEigen", "XLAPjRtCpuClient")
_METADATA = re.compile(r'^\s*%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', re.MULTILINE)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata, from a compiled module's text."""
  return {m.group(1): m.group(2) for m in _METADATA.finditer(hlo_text)}


def source_op(op_name: str) -> str:
  """An op_name with the jit prefix and the while-loop scopes dropped and
  layer numbers folded (`layer_3` -> `layer_N`)."""
  op = re.sub(r"^jit\([^)]*\)/", "", op_name)
  op = re.sub(r"(^|/)(while|body|cond|branch_\d+_fun|checkpoint|remat)(?=/)", "", op)
  op = op.lstrip("/")
  return re.sub(r"layer_\d+", "layer_N", op)


def _rows(times: dict[str, float], calls: dict[str, int], top: int | None):
  total = sum(times.values()) or 1.0
  ranked = sorted(times, key=times.get, reverse=True)
  return [
    {"op": op, "ms": times[op] / 1e6, "share": times[op] / total, "calls": calls[op]}
    for op in ranked[:top]
  ]


def jax_op_profile(
  fn: Callable, *args, top: int | None = 20, trace_dir: str | None = None
) -> list[dict[str, Any]]:
  """Time per source op of one call of `fn(*args)` (`fn` jitted and already
  compiled for these arguments, so no compile lands in the trace)."""
  names = hlo_op_names(fn.lower(*args).compile().as_text())
  with tempfile.TemporaryDirectory(prefix="op_profile_") as scratch:
    folder = trace_dir or scratch
    jax.profiler.start_trace(folder)
    try:
      jax.block_until_ready(fn(*args))
    finally:
      jax.profiler.stop_trace()
    files = sorted(
      glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime
    )
    if not files:
      raise RuntimeError(f"jax.profiler wrote no trace under {folder}")
    data = jax.profiler.ProfileData.from_file(files[-1])
  times: dict[str, float] = collections.defaultdict(float)
  calls: dict[str, int] = collections.defaultdict(int)
  for plane in data.planes:
    for line in plane.lines:
      # XLA's compute threads; the Python thread only wraps them.
      if not any(thread in line.name for thread in _COMPUTE_THREADS):
        continue
      for event in line.events:
        if event.name.startswith(_NOT_OPS) or event.duration_ns <= 0:
          continue
        op = source_op(names[event.name]) if event.name in names else event.name
        times[op] += event.duration_ns
        calls[op] += 1
  if not times:
    raise RuntimeError("the trace holds no XLA compute events")
  return _rows(times, calls, top)


def torch_op_profile(call: Callable[[], Any], top: int | None = 20) -> list[dict[str, Any]]:
  """Self time per PyTorch operator of one `call()` (torch.profiler, CPU)."""
  import torch  # pylint: disable=import-outside-toplevel

  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    call()
  times: dict[str, float] = {}
  calls: dict[str, int] = {}
  for event in prof.key_averages():
    name = re.sub(r"^## Call CompiledFxGraph.*", "CompiledFxGraph (fused kernels)", event.key)
    self_us = event.self_cpu_time_total
    if self_us <= 0:
      continue
    times[name] = times.get(name, 0.0) + self_us * 1e3
    calls[name] = calls.get(name, 0) + event.count
  if not times:
    raise RuntimeError("torch.profiler recorded no operator")
  return _rows(times, calls, top)


def format_profile(title: str, rows: list[dict[str, Any]], top: int = 10) -> str:
  lines = [title, f"  {'share':>6} {'ms':>10} {'calls':>7}  op"]
  for r in rows[:top]:
    lines.append(f"  {100 * r['share']:5.1f}% {r['ms']:10.1f} {r['calls']:7d}  {r['op']}")
  return "\n".join(lines)
