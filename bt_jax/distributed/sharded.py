"""Jitted, shard_map'd sharded decode attention built from a Mesh.

Global layout taken and returned by the built function:
  q        [batch, q_len, heads, head_dim]          replicated
  k_cache  [batch, kv_len, kv_heads, head_dim]      sharded on kv_len over the
  v_cache  [batch, kv_len, kv_heads, head_dim]      sequence axes (contiguous)
  lengths  int32 [batch], GLOBAL valid keys per row  replicated
  -> out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] replicated

Row b sees cache positions [0, lengths[b]) (`lengths` is the exclusive end
`ends` of a window that starts at 0). Shard i holds cache positions
[i * kv_len / p, (i + 1) * kv_len / p); each device derives its own
per-shard end from the global ones (`shard_lengths`).

Mesh axes are taken by name: `sequence_axes` for the one-level methods,
`node_axis` and `local_axis` for "tree_two_level".
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bt_jax.distributed.tree_attention import (
  butterfly_decode_attention,
  tree_decode_attention,
  two_level_tree_decode_attention,
)

# The meshes live with the other meshes (bt_jax.mesh); re-exported here.
from bt_jax.mesh import make_sequence_mesh, make_two_level_mesh  # pylint: disable=unused-import

# The Tree Attention methods; the ring baselines of the study add theirs
# (`bt_jax.distributed.study.METHODS`).
TREE_METHODS = ("tree", "tree_two_level", "tree_butterfly")
# A per-device decode attention: fn(q, k_shard, v_shard, ends_shard, *,
# axis_name, impl, sm_scale) -> (out, lse), run inside shard_map.
PerDeviceAttention = Callable[..., Tuple[jax.Array, jax.Array]]


def _axes_tuple(mesh: Mesh, sequence_axes: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
  if sequence_axes is None:
    return tuple(mesh.axis_names)
  if isinstance(sequence_axes, str):
    sequence_axes = (sequence_axes,)
  unknown = [a for a in sequence_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"sequence axes {unknown} are not in the mesh axes {mesh.axis_names}")
  return tuple(sequence_axes)


def decode_specs(sequence_axes: Tuple[str, ...]) -> Dict[str, P]:
  """PartitionSpecs of q, k_cache, v_cache, lengths, out and lse."""
  kv = P(None, sequence_axes if len(sequence_axes) > 1 else sequence_axes[0])
  return dict(q=P(), k_cache=kv, v_cache=kv, lengths=P(), out=P(), lse=P())


def decode_shardings(
  mesh: Mesh, sequence_axes: Union[None, str, Sequence[str]] = None
) -> Dict[str, NamedSharding]:
  """NamedShardings to `jax.device_put` the inputs with (see decode_specs)."""
  specs = decode_specs(_axes_tuple(mesh, sequence_axes))
  return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


def shard_lengths(lengths: jax.Array, shard_index: jax.Array, shard_len: int) -> jax.Array:
  """Valid keys per row inside shard `shard_index` of a contiguous split.

  Shard i holds cache positions [i * shard_len, (i + 1) * shard_len); a row
  with `lengths[b]` valid keys (its window [0, lengths[b])) has
  clip(lengths[b] - i * shard_len, 0, shard_len) of them there: the shard's
  local `ends`.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  return jnp.clip(lengths - shard_index * shard_len, 0, shard_len).astype(jnp.int32)


def two_level_axes(
  mesh: Mesh, node_axis: str = "node", local_axis: str = "local"
) -> Tuple[str, str]:
  """(node_axis, local_axis), checked against the mesh by name.

  Both must be axes of the mesh, and the mesh must list the node axis
  before the local one (`make_two_level_mesh` does): the KV sequence is
  split node-major, and a mesh given the other way round is an error naming
  its axes, never a silent swap of the fast and slow levels.
  """
  names = tuple(mesh.axis_names)
  missing = [a for a in (node_axis, local_axis) if a not in names]
  if missing or node_axis == local_axis:
    raise ValueError(
      f"tree_two_level needs two sequence axes of the mesh, "
      f"node_axis={node_axis!r} and local_axis={local_axis!r}; "
      f"the mesh's axes are {names}"
    )
  if names.index(node_axis) > names.index(local_axis):
    raise ValueError(
      f"the two-level mesh lists its axes as {names}: the node axis "
      f"{node_axis!r} must come before the local axis {local_axis!r} "
      f"(node-major, as make_two_level_mesh builds it); pass "
      f"node_axis/local_axis by name for the mesh you have"
    )
  return node_axis, local_axis


def make_sharded_decode_attention(
  mesh: Mesh,
  *,
  method: Union[str, PerDeviceAttention] = "tree",
  sequence_axes: Union[None, str, Sequence[str]] = None,
  node_axis: str = "node",
  local_axis: str = "local",
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
  check_vma: bool = False,
) -> Callable[..., Tuple[jax.Array, jax.Array]]:
  """Returns jit(fn)(q, k_cache, v_cache, lengths) -> (out, lse).

  method: "tree" (all-reduce over all sequence axes), "tree_two_level"
  (local all-reduce over `local_axis`, then node all-reduce over
  `node_axis`; see `two_level_axes`), "tree_butterfly" (log2 p explicit
  exchanges), or a per-device function fn(q, k_shard, v_shard, ends_shard,
  *, axis_name, impl, sm_scale) (the study's ring baselines).
  sequence_axes (one-level methods) defaults to all mesh axes, in mesh
  order; for "tree_two_level" it may be omitted or must be exactly
  (node_axis, local_axis). impl: as `bt_jax.attention.kernel_impl`.
  check_vma is off by default because Pallas calls inside shard_map need it
  off (docs/tree_attention.md, "shard_map and check_vma").
  """
  kwargs = dict(impl=impl, sm_scale=sm_scale)
  if method == "tree_two_level":
    node, local = two_level_axes(mesh, node_axis, local_axis)
    if sequence_axes is not None:
      given = (sequence_axes,) if isinstance(sequence_axes, str) else tuple(sequence_axes)
      if given != (node, local):
        raise ValueError(
          f"method='tree_two_level' shards the sequence over "
          f"(node_axis, local_axis) = {(node, local)}; got sequence_axes="
          f"{given} (name the levels with node_axis=/local_axis=)"
        )
    axes = (node, local)
    attend = lambda *a: two_level_tree_decode_attention(
      *a, node_axis=node, local_axis=local, **kwargs
    )
  else:
    axes = _axes_tuple(mesh, sequence_axes)
    axis_name = axes if len(axes) > 1 else axes[0]
    if method == "tree":
      attend = lambda *a: tree_decode_attention(*a, axis_name=axis_name, **kwargs)
    elif method == "tree_butterfly":
      attend = lambda *a: butterfly_decode_attention(*a, axis_name=axis_name, **kwargs)
    elif callable(method):
      attend = lambda *a: method(*a, axis_name=axis_name, **kwargs)
    else:
      raise ValueError(
        f"unknown method {method!r}; valid: {TREE_METHODS} or a per-device "
        "function (the study's ring baselines: "
        "bt_jax.distributed.study.make_method_attention)"
      )
  axis_name = axes if len(axes) > 1 else axes[0]
  num_shards = int(np.prod([mesh.shape[a] for a in axes]))

  def per_device(q, k_shard, v_shard, lengths):
    index = lax.axis_index(axis_name)
    local_lengths = shard_lengths(lengths, index, k_shard.shape[1])
    return attend(q, k_shard, v_shard, local_lengths)

  specs = decode_specs(axes)
  mapped = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(specs["q"], specs["k_cache"], specs["v_cache"], specs["lengths"]),
    out_specs=(specs["out"], specs["lse"]),
    check_vma=check_vma,
  )
  shardings = decode_shardings(mesh, axes)
  jitted = jax.jit(
    mapped,
    in_shardings=(shardings["q"], shardings["k_cache"], shardings["v_cache"], shardings["lengths"]),
    out_shardings=(shardings["out"], shardings["lse"]),
  )

  def sharded_decode_attention(q, k_cache, v_cache, lengths):
    if k_cache.shape[1] % num_shards:
      raise ValueError(
        f"kv_len={k_cache.shape[1]} must be divisible by the {num_shards} "
        f"devices on sequence axes {axes}"
      )
    return jitted(q, k_cache, v_cache, lengths)

  sharded_decode_attention.jitted = jitted  # for .lower(...) / HLO inspection
  return sharded_decode_attention
