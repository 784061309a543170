"""Jitted, shard_map'd sharded decode attention built from a Mesh.

Global layout taken and returned by the built function:
  q        [batch, q_len, heads, head_dim]          replicated
  k_cache  [batch, kv_len, kv_heads, head_dim]      sharded on kv_len over the
  v_cache  [batch, kv_len, kv_heads, head_dim]      sequence axes (contiguous)
  lengths  int32 [batch], GLOBAL valid keys per row  replicated
  -> out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] replicated

Shard i holds cache positions [i * kv_len / p, (i + 1) * kv_len / p); each
device derives its own per-shard lengths from the global ones.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bt_jax.distributed.reference import shard_lengths
from bt_jax.distributed.ring_attention import (ring_kv_decode_attention,
                                               ring_partials_decode_attention)
from bt_jax.distributed.tree_attention import (butterfly_decode_attention,
                                               tree_decode_attention,
                                               two_level_tree_decode_attention)

# The meshes live with the other meshes (bt_jax.mesh); re-exported here.
from bt_jax.mesh import make_sequence_mesh, make_two_level_mesh  # pylint: disable=unused-import

METHODS = ("tree", "tree_two_level", "tree_butterfly", "ring_kv",
           "ring_partials")


def _axes_tuple(mesh: Mesh,
                sequence_axes: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
  if sequence_axes is None:
    return tuple(mesh.axis_names)
  if isinstance(sequence_axes, str):
    sequence_axes = (sequence_axes,)
  unknown = [a for a in sequence_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"sequence axes {unknown} are not in the mesh axes "
                     f"{mesh.axis_names}")
  return tuple(sequence_axes)


def decode_specs(sequence_axes: Tuple[str, ...]) -> Dict[str, P]:
  """PartitionSpecs of q, k_cache, v_cache, lengths, out and lse."""
  kv = P(None, sequence_axes if len(sequence_axes) > 1 else sequence_axes[0])
  return dict(q=P(), k_cache=kv, v_cache=kv, lengths=P(), out=P(), lse=P())


def decode_shardings(mesh: Mesh, sequence_axes: Union[None, str, Sequence[str]]
                     = None) -> Dict[str, NamedSharding]:
  """NamedShardings to `jax.device_put` the inputs with (see decode_specs)."""
  specs = decode_specs(_axes_tuple(mesh, sequence_axes))
  return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


def make_sharded_decode_attention(
    mesh: Mesh, *, method: str = "tree",
    sequence_axes: Union[None, str, Sequence[str]] = None,
    impl: Optional[str] = None, sm_scale: Optional[float] = None,
    check_vma: bool = False) -> Callable[..., Tuple[jax.Array, jax.Array]]:
  """Returns jit(fn)(q, k_cache, v_cache, lengths) -> (out, lse).

  method: "tree" (all-reduce over all sequence axes), "tree_two_level" (needs
  sequence_axes = (node, local): local all-reduce then node all-reduce),
  "tree_butterfly" (log2 p explicit exchanges), "ring_kv", "ring_partials".
  sequence_axes defaults to all mesh axes, node-major. check_vma is off by
  default because Pallas calls inside shard_map need it off.
  """
  axes = _axes_tuple(mesh, sequence_axes)
  axis_name = axes if len(axes) > 1 else axes[0]
  num_shards = int(np.prod([mesh.shape[a] for a in axes]))
  kwargs = dict(impl=impl, sm_scale=sm_scale)
  if method == "tree":
    attend = lambda *a: tree_decode_attention(*a, axis_name=axis_name, **kwargs)
  elif method == "tree_two_level":
    if len(axes) != 2:
      raise ValueError("method='tree_two_level' needs two sequence axes "
                       f"(node, local); got {axes}")
    attend = lambda *a: two_level_tree_decode_attention(
        *a, node_axis=axes[0], local_axis=axes[1], **kwargs)
  elif method == "tree_butterfly":
    attend = lambda *a: butterfly_decode_attention(*a, axis_name=axis_name,
                                                   **kwargs)
  elif method == "ring_kv":
    attend = lambda *a: ring_kv_decode_attention(*a, axis_name=axis_name,
                                                 **kwargs)
  elif method == "ring_partials":
    attend = lambda *a: ring_partials_decode_attention(*a, axis_name=axis_name,
                                                       **kwargs)
  else:
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")

  def per_device(q, k_shard, v_shard, lengths):
    index = lax.axis_index(axis_name)
    local_lengths = shard_lengths(lengths, index, k_shard.shape[1])
    return attend(q, k_shard, v_shard, local_lengths)

  specs = decode_specs(axes)
  mapped = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(specs["q"], specs["k_cache"], specs["v_cache"],
                specs["lengths"]),
      out_specs=(specs["out"], specs["lse"]), check_vma=check_vma)
  shardings = decode_shardings(mesh, axes)
  jitted = jax.jit(
      mapped,
      in_shardings=(shardings["q"], shardings["k_cache"],
                    shardings["v_cache"], shardings["lengths"]),
      out_shardings=(shardings["out"], shardings["lse"]))

  def sharded_decode_attention(q, k_cache, v_cache, lengths):
    if k_cache.shape[1] % num_shards:
      raise ValueError(
          f"kv_len={k_cache.shape[1]} must be divisible by the {num_shards} "
          f"devices on sequence axes {axes}")
    return jitted(q, k_cache, v_cache, lengths)

  sharded_decode_attention.jitted = jitted  # for .lower(...) / HLO inspection
  return sharded_decode_attention
