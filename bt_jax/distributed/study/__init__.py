"""The Tree Attention study: baselines, the energy view and traffic counting.

Not used by generation (that is `bt_jax.distributed`: `tree_decode_attention`,
the merges and `ShardedKVCache`). What the paper's claims are checked with
(docs/tree_attention.md, experiments/tree_vs_ring.py):

  ring_kv_decode_attention, ring_partials_decode_attention
      the ring baselines, inside `jax.shard_map`, same layout as the tree;
  METHODS, make_method_attention(mesh, method=...)
      every method of the sweep (tree ones and rings) built from a Mesh;
  attention_energy, attention_from_energy, sharded_energy
      the energy view (paper section 3): grad at z = 0 is attention;
  collective_traffic, parse_collectives, formula_traffic
      bytes each device sends, read from compiled HLO, and the formulas.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import Mesh

from bt_jax.distributed.sharded import TREE_METHODS, make_sharded_decode_attention
from bt_jax.distributed.study.energy import attention_energy, attention_from_energy, sharded_energy
from bt_jax.distributed.study.hlo_traffic import (
  collective_traffic,
  formula_traffic,
  parse_collectives,
)
from bt_jax.distributed.study.ring_attention import (
  ring_kv_decode_attention,
  ring_partials_decode_attention,
)

RING_METHODS = {
  "ring_kv": ring_kv_decode_attention,
  "ring_partials": ring_partials_decode_attention,
}
METHODS = TREE_METHODS + tuple(RING_METHODS)


def make_method_attention(
  mesh: Mesh,
  *,
  method: str = "tree",
  sequence_axes: Union[None, str, Sequence[str]] = None,
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
  check_vma: bool = False,
  **kwargs,
) -> Callable[..., Tuple[jax.Array, jax.Array]]:
  """`make_sharded_decode_attention` for any of METHODS, rings included."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
  return make_sharded_decode_attention(
    mesh,
    method=RING_METHODS.get(method, method),
    sequence_axes=sequence_axes,
    impl=impl,
    sm_scale=sm_scale,
    check_vma=check_vma,
    **kwargs,
  )


__all__ = [
  "METHODS",
  "RING_METHODS",
  "attention_energy",
  "attention_from_energy",
  "collective_traffic",
  "formula_traffic",
  "make_method_attention",
  "parse_collectives",
  "ring_kv_decode_attention",
  "ring_partials_decode_attention",
  "sharded_energy",
]
