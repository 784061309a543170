"""Distributed decode: Tree Attention (arXiv 2408.04093) and sharded KV caches.

The product (what generation uses):
  tree_decode_attention, two_level_tree_decode_attention,
  butterfly_decode_attention -> (out, lse), inside `jax.shard_map`, axes by
      name; per-row windows [starts, ends) of this device's slots;
  allreduce_merge, merge_pair, merge_many: the log-sum-exp merge
      (bt_jax/distributed/merge.py, the one copy of its math);
  ShardedKVCache (passed by the decoders of `bt_jax.inference`),
      physical_slots, to_logical_order, round_robin_mask: generation with
      KV caches sharded over a `sequence` axis in round-robin slots;
  make_sequence_mesh, make_two_level_mesh, make_sharded_decode_attention,
      decode_shardings, shard_lengths: the tree methods built from a Mesh,
      on global arrays;
  full_decode_attention_reference: the deliberately independent oracle the
      tests compare against.

The study (ring baselines, the energy view, HLO traffic counting, the sweep
of every method) is `bt_jax.distributed.study`.
"""

from bt_jax.distributed.merge import allreduce_merge, merge_many, merge_pair
from bt_jax.distributed.reference import full_decode_attention_reference
from bt_jax.distributed.sharded import (
  TREE_METHODS,
  decode_shardings,
  make_sequence_mesh,
  make_sharded_decode_attention,
  make_two_level_mesh,
  shard_lengths,
  two_level_axes,
)
from bt_jax.distributed.sharded_cache import (
  ShardedKVCache,
  masked_partial_attention,
  physical_slots,
  round_robin_mask,
  to_logical_order,
)
from bt_jax.distributed.tree_attention import (
  butterfly_decode_attention,
  local_decode_attention,
  tree_decode_attention,
  two_level_tree_decode_attention,
)

__all__ = [
  "ShardedKVCache",
  "TREE_METHODS",
  "allreduce_merge",
  "butterfly_decode_attention",
  "decode_shardings",
  "full_decode_attention_reference",
  "local_decode_attention",
  "make_sequence_mesh",
  "make_sharded_decode_attention",
  "make_two_level_mesh",
  "masked_partial_attention",
  "merge_many",
  "merge_pair",
  "physical_slots",
  "round_robin_mask",
  "shard_lengths",
  "to_logical_order",
  "tree_decode_attention",
  "two_level_axes",
  "two_level_tree_decode_attention",
]
