"""Tree Attention: decode attention over a KV cache sharded on the sequence.

Paper: "Tree Attention: Topology-aware Decoding for Long-Context Attention on
GPU clusters" (arXiv 2408.04093). Every function here runs INSIDE
`jax.shard_map`; `bt_jax.distributed.sharded` builds the jitted, shard_map'd
versions from a Mesh.

Layout (the `bt_jax.attention.decode_attention` contract), per device:
  q               [batch, q_len, heads, head_dim]        replicated
  k_shard/v_shard [batch, shard_len, kv_heads, head_dim] this device's keys
  ends_shard      int32 [batch]: row b sees local slots [starts[b], ends[b])
  starts          optional int32 [batch], default 0 (then ends_shard is the
                  number of valid keys in this shard)
Returns out [batch, q_len, heads, head_dim] (q.dtype) and lse
[batch, heads, q_len] float32 over ALL shards, identical on every device.
`impl`: None (auto), "xla", "pallas", "pallas_interpret", as in
`bt_jax.attention.kernel_impl`.

Axes are taken by name: `axis_name` (one mesh axis or a tuple of them), or
`node_axis` and `local_axis` for the two-level tree.

Each device attends over its own shard once (the only O(context) work); the
partials are merged by all-reduces of max and sum, which XLA/NCCL carry out as
reductions of depth ~log p. The explicit butterfly variant spells the log2 p
steps out with `ppermute` so that the step count is visible in the HLO.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from bt_jax.attention import decode_attention
from bt_jax.distributed.merge import AxisName, allreduce_merge, merge_pair


def local_decode_attention(
  q: jax.Array,
  k_shard: jax.Array,
  v_shard: jax.Array,
  ends_shard: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  sm_scale: Optional[float] = None,
  impl: Optional[str] = None,
) -> Tuple[jax.Array, jax.Array]:
  """This device's partial (o, lse) over its own shard; o is cast to f32."""
  out, lse = decode_attention(
    q,
    k_shard,
    v_shard,
    jnp.asarray(ends_shard, jnp.int32),
    starts=starts,
    sm_scale=sm_scale,
    impl=impl,
  )
  return out.astype(jnp.float32), lse.astype(jnp.float32)


def tree_decode_attention(
  q: jax.Array,
  k_shard: jax.Array,
  v_shard: jax.Array,
  ends_shard: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  axis_name: AxisName = "sequence",
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Tree Attention over the mesh axis (or tuple of axes) `axis_name`.

  Row b sees this device's local slots [starts[b], ends_shard[b]) (starts
  default 0: a left-padded or round-robin cache passes its per-row local
  start). Returns (out [batch, q_len, heads, head_dim] in q.dtype, lse
  [batch, heads, q_len] f32). Rows with no valid key on any device give
  out 0, lse -inf. Generation's sharded KV cache
  (`bt_jax.distributed.ShardedKVCache`) calls this for its decode steps.
  """
  o, lse = local_decode_attention(
    q, k_shard, v_shard, ends_shard, starts=starts, sm_scale=sm_scale, impl=impl
  )
  out, lse = allreduce_merge(o, lse, axis_name)
  return out.astype(q.dtype), lse


def two_level_tree_decode_attention(
  q: jax.Array,
  k_shard: jax.Array,
  v_shard: jax.Array,
  ends_shard: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  node_axis: str = "node",
  local_axis: str = "local",
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Tree Attention on a (node, local) mesh: merge inside a node first.

  The first all-reduce runs over the fast local links (NVLink); only the
  node-level partials, already merged, cross the slow links (InfiniBand). The
  KV sequence must be sharded over (node_axis, local_axis), node-major
  (`make_sharded_decode_attention(method="tree_two_level")` checks the mesh).
  """
  o, lse = local_decode_attention(
    q, k_shard, v_shard, ends_shard, starts=starts, sm_scale=sm_scale, impl=impl
  )
  o, lse = allreduce_merge(o, lse, local_axis)
  out, lse = allreduce_merge(o, lse, node_axis)
  return out.astype(q.dtype), lse


def butterfly_decode_attention(
  q: jax.Array,
  k_shard: jax.Array,
  v_shard: jax.Array,
  ends_shard: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  axis_name: AxisName = "sequence",
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Tree Attention with the reduction tree written out: log2 p exchanges.

  Step s swaps partials with the device whose index differs in bit s
  (recursive doubling) and merges pairwise, so after log2 p steps every device
  holds the full result. Needs p to be a power of two.
  """
  num_devices = lax.axis_size(axis_name)
  if num_devices & (num_devices - 1):
    raise ValueError(
      f"butterfly_decode_attention needs a power-of-two device count on "
      f"{axis_name!r}; got {num_devices} (use tree_decode_attention)"
    )
  o, lse = local_decode_attention(
    q, k_shard, v_shard, ends_shard, starts=starts, sm_scale=sm_scale, impl=impl
  )
  distance = 1
  while distance < num_devices:
    partner = [(i, i ^ distance) for i in range(num_devices)]
    o_other, lse_other = lax.ppermute((o, lse), axis_name, partner)
    o, lse = merge_pair(o, lse, o_other, lse_other)
    distance *= 2
  return o.astype(q.dtype), lse
