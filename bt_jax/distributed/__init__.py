"""Distributed decode: Tree Attention and its ring baselines (GitHub issue 6).

Inside `jax.shard_map` (per-device shards):
  tree_decode_attention, two_level_tree_decode_attention,
  butterfly_decode_attention, ring_kv_decode_attention,
  ring_partials_decode_attention -> (out, lse)
From a Mesh (global arrays): make_sharded_decode_attention.
Generation with sharded KV caches (round-robin slots, Tree Attention):
sharded_kv_cache, ShardedKVCache, physical_slots, to_logical_order.
Math: attention_energy (grad at z = 0 is attention), merge_pair,
allreduce_merge; oracle: full_decode_attention_reference.
"""

from bt_jax.distributed.energy import (attention_energy, attention_from_energy,
                                       sharded_energy)
from bt_jax.distributed.hlo_traffic import collective_traffic
from bt_jax.distributed.merge import allreduce_merge, merge_many, merge_pair
from bt_jax.distributed.reference import (full_decode_attention_reference,
                                          shard_lengths)
from bt_jax.distributed.ring_attention import (ring_kv_decode_attention,
                                               ring_partials_decode_attention)
from bt_jax.distributed.sharded_cache import (ShardedKVCache,
                                              active_sharded_kv_cache,
                                              masked_partial_attention,
                                              physical_slots, round_robin_mask,
                                              sharded_kv_cache, to_logical_order)
from bt_jax.distributed.sharded import (METHODS, decode_shardings,
                                        make_sequence_mesh,
                                        make_sharded_decode_attention,
                                        make_two_level_mesh)
from bt_jax.distributed.tree_attention import (butterfly_decode_attention,
                                               local_decode_attention,
                                               tree_decode_attention,
                                               two_level_tree_decode_attention)

__all__ = [
    "METHODS",
    "ShardedKVCache",
    "active_sharded_kv_cache",
    "allreduce_merge",
    "attention_energy",
    "attention_from_energy",
    "butterfly_decode_attention",
    "collective_traffic",
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
    "ring_kv_decode_attention",
    "ring_partials_decode_attention",
    "round_robin_mask",
    "shard_lengths",
    "sharded_energy",
    "sharded_kv_cache",
    "to_logical_order",
    "tree_decode_attention",
    "two_level_tree_decode_attention",
]
