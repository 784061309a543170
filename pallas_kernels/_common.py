"""Helpers shared by the Pallas kernels: impl/target choice, padding, params.

A kernel body here is written once and lowered three ways:
  * "gpu": Triton lowering (`plgpu.CompilerParams` is always passed, which
    selects Triton even where Mosaic GPU is the default); arrays keep the
    model's `[batch, len, heads, head_dim]` layout, head_dim padded to a
    power of two (Triton tiles must be powers of two).
  * "tpu": Mosaic lowering; arrays are moved to `[batch, heads, len, head_dim]`
    so every block's last two dims are tile-aligned or full.
  * interpret: the "gpu" variant run by the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

IMPLS = ("pallas", "interpret", "xla")
TARGETS = ("gpu", "tpu")

# Finite stand-in for -inf inside kernels: exp2(MASK - m) underflows to 0 and
# MASK - MASK is 0 (not NaN), so fully masked tiles stay finite.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def resolve_impl(impl: Optional[str]) -> str:
  """None -> "pallas" on gpu/tpu, "xla" on cpu; validates explicit choices."""
  if impl is None:
    return "pallas" if jax.default_backend() in TARGETS else "xla"
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS} or None; got {impl!r}")
  return impl


_forced_target: Optional[str] = None


@contextlib.contextmanager
def force_target(target: str) -> Iterator[None]:
  """Trace impl="pallas" calls for `target` whatever the local backend.

  For checking on a CPU machine that the kernels lower for another platform:
  `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` under
  `force_target("gpu")` runs the real Triton lowering (likewise "tpu"/Mosaic).
  """
  global _forced_target
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
  previous, _forced_target = _forced_target, target
  try:
    yield
  finally:
    _forced_target = previous


def resolve_target(impl: str) -> str:
  """The lowering a Pallas call is written for, from the backend at trace time."""
  if impl == "interpret":
    return "gpu"
  if _forced_target is not None:
    return _forced_target
  backend = jax.default_backend()
  if backend not in TARGETS:
    raise ValueError(
      f"impl='pallas' needs a gpu or tpu backend; the default backend is "
      f"{backend!r}. Use impl='interpret' (slow, for tests) or impl='xla'."
    )
  return backend


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pick_block(requested: Optional[int], default: int, length: int) -> int:
  """A power-of-two tile no larger than needed for `length` (>= 16 for dots)."""
  block = default if requested is None else requested
  if block <= 0 or block & (block - 1):
    raise ValueError(f"block sizes must be positive powers of two; got {block}")
  if block < 16:
    raise ValueError(f"block sizes must be >= 16 (matmul tiles); got {block}")
  return min(block, max(16, pl.next_power_of_2(length)))


def padded_head_dim(head_dim: int, target: str) -> int:
  # Triton tensors need power-of-two shapes; Mosaic accepts the full dim.
  if target == "gpu":
    return max(16, pl.next_power_of_2(head_dim))
  return head_dim


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads `x` at the end of `axis` up to `size` (no-op when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


@functools.cache
def _quiet_triton_deprecation() -> None:
  """jax 0.11 warns at every Triton lowering that the backend is deprecated.

  The warning is raised when the surrounding jit compiles, after our call has
  returned, so only a process-wide filter can catch it; it matches that one
  message only. Triton stays the GPU lowering here because it runs these
  kernels on every CUDA GPU (Mosaic GPU needs Hopper and a rewrite).
  """
  warnings.filterwarnings(
    "ignore", message=r".*Pallas Triton backend is deprecated.*", category=DeprecationWarning
  )


def compiler_params(target: str, num_grid_dims: int, num_warps: int, num_stages: int):
  """Backend compiler params; grid axes are all independent (parallel).

  On GPU, passing Triton's params selects the Triton lowering even where
  Mosaic GPU is the default for pallas_call.
  """
  if target == "gpu":
    _quiet_triton_deprecation()
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_dims)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, k] @ b[n, k].T -> [m, n] float32 (no explicit transpose op)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, k] @ b [k, n] -> [m, n] float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
