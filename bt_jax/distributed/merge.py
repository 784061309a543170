"""Merging partial attention results (o, lse) computed over disjoint key sets.

A partial is the attention output `o` over some keys, `[batch, q_len, heads,
head_dim]`, and the natural-log log-sum-exp `lse` of the scaled scores over
those keys, `[batch, heads, q_len]`. A key set with no valid key has lse = -inf
and must contribute nothing, whatever its `o` holds.

Two partials merge as
    L = logaddexp(l1, l2);  o = exp(l1 - L) o1 + exp(l2 - L) o2,
which is associative and commutative, so partials from p devices can be merged
in any order: a ring (p - 1 steps), a butterfly (log2 p steps) or one
all-reduce of max and sum (`allreduce_merge`). All merging is float32.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Union[str, Tuple[str, ...]]


def _lse_weight_to_output_layout(weight: jax.Array) -> jax.Array:
  """[batch, heads, q_len] -> [batch, q_len, heads, 1] to scale an output."""
  return jnp.swapaxes(weight, 1, 2)[..., None]


def _finite_or_zero(x: jax.Array) -> jax.Array:
  """Replaces -inf (all-empty rows) by 0 so that `lse - x` stays -inf, not NaN."""
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _scaled(o: jax.Array, lse: jax.Array, reference: jax.Array) -> jax.Array:
  """o * exp(lse - reference) in f32; exactly 0 where lse = -inf.

  `reference` must be finite (see `_finite_or_zero`). The `where` keeps a NaN
  or inf in the output of an empty partial from leaking into the sum.
  """
  weight = jnp.exp(lse - reference)
  scaled = o.astype(jnp.float32) * _lse_weight_to_output_layout(weight)
  has_keys = _lse_weight_to_output_layout(jnp.isfinite(lse))
  return jnp.where(has_keys, scaled, 0.0)


def merge_pair(
  o1: jax.Array, lse1: jax.Array, o2: jax.Array, lse2: jax.Array
) -> Tuple[jax.Array, jax.Array]:
  """Merges two partials over disjoint key sets; returns (o f32, lse f32)."""
  lse1 = lse1.astype(jnp.float32)
  lse2 = lse2.astype(jnp.float32)
  lse = jnp.logaddexp(lse1, lse2)  # -inf when both are empty
  reference = _finite_or_zero(lse)
  o = _scaled(o1, lse1, reference) + _scaled(o2, lse2, reference)
  return o, lse


def merge_many(partials: Sequence[Tuple[jax.Array, jax.Array]]) -> Tuple[jax.Array, jax.Array]:
  """Merges a list of (o, lse) partials on one device (max and sum form)."""
  if not partials:
    raise ValueError("merge_many needs at least one (o, lse) partial")
  lses = jnp.stack([lse.astype(jnp.float32) for _, lse in partials])
  global_max = _finite_or_zero(jnp.max(lses, axis=0))
  numerator = sum(_scaled(o, lse, global_max) for o, lse in partials)
  denominator = jnp.sum(jnp.exp(lses - global_max), axis=0)
  return _normalise(numerator, denominator, global_max)


def _normalise(
  numerator: jax.Array, denominator: jax.Array, global_max: jax.Array
) -> Tuple[jax.Array, jax.Array]:
  """(n / d, M + log d) with all-empty rows (d = 0) giving (0, -inf)."""
  nonempty = denominator > 0
  safe_denominator = jnp.where(nonempty, denominator, 1.0)
  out = numerator / _lse_weight_to_output_layout(safe_denominator)
  lse = jnp.where(nonempty, global_max + jnp.log(safe_denominator), -jnp.inf)
  return out, lse


def allreduce_merge(
  o: jax.Array, lse: jax.Array, axis_name: AxisName
) -> Tuple[jax.Array, jax.Array]:
  """Tree Attention's merge of per-device partials over a mesh axis.

  Must run inside `shard_map`. Three collectives on f32 data:
  M = pmax(lse); n = psum(o exp(lse - M)); d = psum(exp(lse - M)); the result
  is (n / d, M + log d) on every device. Per device this moves
  batch * heads * q_len * (head_dim + 2) numbers, whatever the context length.
  """
  lse = lse.astype(jnp.float32)
  global_max = _finite_or_zero(lax.pmax(lse, axis_name))
  numerator, denominator = lax.psum(
    (_scaled(o, lse, global_max), jnp.exp(lse - global_max)), axis_name
  )
  return _normalise(numerator, denominator, global_max)
