"""Ring baselines for sharded decode attention (run inside `jax.shard_map`).

Part of the study (`bt_jax.distributed.study`), not of generation: what
Tree Attention is compared against. Same layout and result as
`tree_decode_attention` (see bt_jax/distributed/tree_attention.py); the
per-shard argument is `ends_shard` (exclusive end slot in this shard).

- ring of K/V (the Tree Attention paper's baseline, Ring Attention applied to
  decode): the K/V shards travel around the ring, p - 1 `ppermute` steps of
  2 * batch * shard_len * kv_heads * head_dim elements each; every device
  attends over every shard as it arrives, so each device also does the whole
  context's attention work.
- ring of partials: each device attends over its own shard once and only the
  small (o, lse) partials travel, p - 1 steps. It has the tree's traffic volume
  per step and the ring's step count.

The loops are Python loops: p is static, and the unrolled steps let XLA
overlap a transfer with the next block's compute and keep every collective
visible in the compiled HLO.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from bt_jax.distributed.merge import AxisName, merge_pair
from bt_jax.distributed.tree_attention import local_decode_attention


def _ring_permutation(num_devices: int):
  return [(i, (i + 1) % num_devices) for i in range(num_devices)]


def ring_kv_decode_attention(
  q: jax.Array,
  k_shard: jax.Array,
  v_shard: jax.Array,
  ends_shard: jax.Array,
  *,
  axis_name: AxisName = "sequence",
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Ring Attention for decode: rotate K/V (and their ends), merge as they come."""
  num_devices = lax.axis_size(axis_name)
  permutation = _ring_permutation(num_devices)
  block = (k_shard, v_shard, jnp.asarray(ends_shard, jnp.int32))
  o, lse = local_decode_attention(q, *block, sm_scale=sm_scale, impl=impl)
  for _ in range(num_devices - 1):
    block = lax.ppermute(block, axis_name, permutation)
    o_block, lse_block = local_decode_attention(q, *block, sm_scale=sm_scale, impl=impl)
    o, lse = merge_pair(o, lse, o_block, lse_block)
  return o.astype(q.dtype), lse


def ring_partials_decode_attention(
  q: jax.Array,
  k_shard: jax.Array,
  v_shard: jax.Array,
  ends_shard: jax.Array,
  *,
  axis_name: AxisName = "sequence",
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Local attention once, then pass (o, lse) partials around the ring."""
  num_devices = lax.axis_size(axis_name)
  permutation = _ring_permutation(num_devices)
  o, lse = local_decode_attention(q, k_shard, v_shard, ends_shard, sm_scale=sm_scale, impl=impl)
  message = (o, lse)
  for _ in range(num_devices - 1):
    message = lax.ppermute(message, axis_name, permutation)
    o, lse = merge_pair(o, lse, *message)
  return o.astype(q.dtype), lse
