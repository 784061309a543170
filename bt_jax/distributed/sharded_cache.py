"""Generation with the KV cache sharded over the `sequence` mesh axis.

    sharding = ShardedKVCache(make_sequence_mesh(8))
    logits, cache = model.apply(params, tokens, positions, cache, index, mask,
                                method=VanillaLM.decode, window=window,
                                sharding=sharding)

Given `sharding`, every cached self-attention of the call
(`bt_jax.attention.attend`) keeps its cache sharded over the axis and
attends by Tree Attention (`tree_decode_attention`): each device attends over
its own shard, and the partial (out, lse) are merged by all-reduces of max
and sum (`allreduce_merge`). The decoders of `bt_jax.inference` pass it only
to the calls whose cache is to be sharded (the Block Transformer's token
decoder keeps its small local cache whole).

Layout. A cache of C = p * S slots (p devices on the axis) is stored in
round-robin order: logical slot t (the slot the decoders and masks speak of)
lives at physical slot

    (t % p) * S + t // p,

i.e. on device t % p, at local index t // p. Slots are filled in logical order
(the prompt, then one per step), so every device gets one new entry every p
steps and the shards never differ by more than one written slot; a contiguous
split would fill device 0 first and leave the others idle. Reading the first
n logical slots is reading the first ceil(n / p) local slots on each device,
so a decode loop that reads only the filled part of the cache (`read_slots`)
stays cheap. Masks, cache indices and positions stay in logical order: the
layout is private to this module. `to_logical_order` undoes it (for tests).

Batch. With `batch_axis` (the decoders use the mesh's `data` axis when it has
one, e.g. `make_sequence_mesh(4, data_devices=2)`: a 2 x 4 data x sequence
mesh) the rows are split too: each device holds its rows' part of its cache
shard, the tree all-reduce runs within each row group, and the batch must be
a multiple of the data axis.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bt_jax import axes
from bt_jax.attention import KERNEL_IMPLS, Window, xla_attention_with_lse
from bt_jax.distributed.merge import allreduce_merge
from bt_jax.distributed.tree_attention import tree_decode_attention


def physical_slots(logical: jax.Array, cache_len: int, num_shards: int) -> jax.Array:
  """Physical cache index of each logical slot: (t % p) * (C / p) + t // p."""
  if cache_len % num_shards:
    raise ValueError(f"cache_len {cache_len} is not a multiple of the {num_shards} shards")
  return (logical % num_shards) * (cache_len // num_shards) + logical // num_shards


def to_logical_order(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  """Reorders a round-robin cache array along `axis` into logical slot order."""
  x = jnp.moveaxis(x, axis, 0)
  cache_len = x.shape[0]
  if cache_len % num_shards:
    raise ValueError(f"cache_len {cache_len} is not a multiple of the {num_shards} shards")
  # physical [p, S] -> logical [S, p]: logical t = local * p + shard.
  x = x.reshape(num_shards, cache_len // num_shards, *x.shape[1:]).swapaxes(0, 1)
  return jnp.moveaxis(x.reshape(cache_len, *x.shape[2:]), 0, axis)


def round_robin_mask(mask: jax.Array, num_shards: int) -> jax.Array:
  """Logical mask [..., read_len] -> [..., p * r] in the devices' read order.

  r = ceil(read_len / p) local slots are read per device; entry i * r + j is
  logical slot j * p + i (False beyond read_len), so that splitting the last
  axis into p equal parts gives each device the mask of its local slots 0..r-1.
  """
  read_len = mask.shape[-1]
  per_shard = -(-read_len // num_shards)
  padding = [(0, 0)] * (mask.ndim - 1) + [(0, per_shard * num_shards - read_len)]
  mask = jnp.pad(mask, padding, constant_values=False)
  mask = mask.reshape(*mask.shape[:-1], per_shard, num_shards)
  return jnp.swapaxes(mask, -1, -2).reshape(*mask.shape[:-2], per_shard * num_shards)


def masked_partial_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, scale: Optional[float] = None
) -> Tuple[jax.Array, jax.Array]:
  """Attention over one device's keys under a boolean mask, as a partial.

  query [batch, q_len, heads, head_dim]; key/value [batch, kv_len, kv_heads,
  head_dim] (GQA when kv_heads < heads); mask [batch|1, q_len, kv_len].
  Returns o [batch, q_len, heads, head_dim] f32 and lse [batch, heads, q_len]
  f32 (natural log); a query that sees no key here gives o = 0, lse = -inf.
  """
  return xla_attention_with_lse(query, key, value, mask=mask, scale=scale)


@dataclasses.dataclass(frozen=True)
class ShardedKVCache:
  """A mesh axis to shard KV caches over (see the module docstring)."""

  mesh: Mesh
  axis: str = axes.MESH_SEQUENCE
  batch_axis: Optional[str] = None  # also split the rows (batch) over this axis

  def __post_init__(self):
    if self.axis not in self.mesh.axis_names:
      raise ValueError(
        f"the mesh has no {self.axis!r} axis to shard the KV cache over; its axes are "
        f"{tuple(self.mesh.axis_names)} (make one with "
        f"bt_jax.distributed.make_sequence_mesh(num_devices, axis_name={self.axis!r}))"
      )
    if self.batch_axis is not None and (
      self.batch_axis not in self.mesh.axis_names or self.batch_axis == self.axis
    ):
      raise ValueError(
        f"batch_axis={self.batch_axis!r} must be a mesh axis other than "
        f"{self.axis!r}; the mesh's axes are {tuple(self.mesh.axis_names)}"
      )

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.axis]

  @property
  def batch_shards(self) -> int:
    """How many ways the rows are split (1 without a batch axis)."""
    return 1 if self.batch_axis is None else self.mesh.shape[self.batch_axis]

  @property
  def cache_sharding(self) -> NamedSharding:
    """[batch, cache_len, heads, head_dim] split on cache_len (and on batch
    over `batch_axis`), whole elsewhere."""
    return NamedSharding(self.mesh, P(self.batch_axis, self.axis))

  @property
  def rows_sharding(self) -> NamedSharding:
    """Per-row arrays [batch, ...]: split over `batch_axis`, else replicated."""
    return NamedSharding(self.mesh, P(self.batch_axis))

  def check_batch(self, batch: int) -> None:
    if batch % self.batch_shards:
      raise ValueError(
        f"a batch of {batch} rows cannot be split evenly over the "
        f"{self.batch_shards} devices of mesh axis {self.batch_axis!r}; "
        f"use a multiple of {self.batch_shards} rows"
      )

  def padded_cache_len(self, length: int) -> int:
    """The smallest multiple of the shard count that holds `length` slots."""
    return -(-length // self.num_shards) * self.num_shards

  def attend(
    self,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: dict,
    cache_index,
    mask: jax.Array,
    *,
    window: Optional[Window] = None,
    impl: str = "xla",
  ) -> Tuple[jax.Array, dict]:
    """Writes key/value at logical slots cache_index.. and attends; see
    `bt_jax.attention.attend`, which calls this.

    query [batch, q_len, heads, head_dim] and the new key/value [batch, q_len,
    kv_heads, head_dim] are replicated (split by rows over `batch_axis` when
    there is one); cache {"key", "value"} [batch, cache_len, kv_heads,
    head_dim] is round-robin and sharded on cache_len (and on batch);
    mask [batch|1, q_len, read_len] is in logical order and covers the first
    read_len logical slots. Returns (out [batch, q_len, heads, head_dim] in
    query.dtype, the new cache, still sharded).

    A single-query step given its `window` (starts, ends) of logical slots
    with impl "pallas"/"pallas_interpret" runs Tree Attention with the
    decode kernel on each device over its local part of the window: on
    device s, logical [start, end) is the contiguous local run
    [ceil((start - s) / p), ceil((end - s) / p)). Any other step attends
    under the mask on each device (masked jnp), merged the same way.
    """
    num_shards, axis, rows = self.num_shards, self.axis, self.batch_axis
    batch, cache_len = cache["key"].shape[:2]
    read_len = mask.shape[-1]
    self.check_batch(batch)
    if rows is not None:  # a mask shared by the rows is split with them
      mask = jnp.broadcast_to(mask, (batch,) + mask.shape[1:])
    if cache_len % num_shards:
      raise ValueError(
        f"a KV cache of {cache_len} slots cannot be split evenly over the "
        f"{num_shards} devices of mesh axis {axis!r}; allocate "
        f"{self.padded_cache_len(cache_len)} slots"
      )
    if read_len > cache_len:
      raise ValueError(f"the mask reads {read_len} slots of a {cache_len}-slot cache")
    local_len = cache_len // num_shards
    read_local = -(-read_len // num_shards)
    index = jnp.asarray(cache_index, jnp.int32)
    per_row = index.ndim == 1  # a slot per row (speculative decoding)
    if per_row and index.shape != (batch,):
      raise ValueError(
        f"cache_index must be a scalar or int32 [batch={batch}]; got shape {index.shape}"
      )
    new_slots = jnp.arange(key.shape[1], dtype=jnp.int32)
    logical = index[:, None] + new_slots[None, :] if per_row else index + new_slots
    use_kernel = impl in KERNEL_IMPLS and window is not None and query.shape[1] == 1
    if use_kernel:
      window = tuple(jnp.broadcast_to(jnp.asarray(w, jnp.int32), (batch,)) for w in window)
    else:
      window = None

    def per_device(query, key, value, cache_key, cache_value, mask, window, logical):
      shard = lax.axis_index(axis)
      # Entries owned by other devices get an out-of-range index and are dropped.
      local = jnp.where(logical % num_shards == shard, logical // num_shards, local_len)
      if per_row:  # local [rows here, q]: each row writes its own slots
        at = (jnp.arange(local.shape[0])[:, None], local)
      else:
        at = (slice(None), local)
      cache_key = cache_key.at[at].set(key.astype(cache_key.dtype), mode="drop")
      cache_value = cache_value.at[at].set(value.astype(cache_value.dtype), mode="drop")
      if use_kernel:
        start, end = window
        # Logical slot t = j * p + shard is local slot j: the window
        # [start, end) is local [ceil((start - shard) / p), ceil((end - shard) / p)).
        local_start = jnp.clip((start - shard + num_shards - 1) // num_shards, 0, read_local)
        local_end = jnp.clip((end - shard + num_shards - 1) // num_shards, 0, read_local)
        out, _ = tree_decode_attention(
          query, cache_key, cache_value, local_end, starts=local_start, axis_name=axis, impl=impl
        )
      else:
        o, lse = masked_partial_attention(
          query,
          cache_key[:, :read_local].astype(query.dtype),
          cache_value[:, :read_local].astype(query.dtype),
          mask,
        )
        out, _ = allreduce_merge(o, lse, axis)
      return out.astype(query.dtype), cache_key, cache_value

    kv_spec = P(rows, axis)
    masked = round_robin_mask(mask, num_shards)
    window_spec = (P(rows), P(rows)) if use_kernel else P()
    out, cache_key, cache_value = jax.shard_map(
      per_device,
      mesh=self.mesh,
      in_specs=(
        P(rows),
        P(rows),
        P(rows),
        kv_spec,
        kv_spec,
        P(rows, None, axis),
        window_spec,
        P(rows) if per_row else P(),
      ),
      out_specs=(P(rows), kv_spec, kv_spec),
      # pallas_call has no varying-manual-axes rule: see docs/tree_attention.md.
      check_vma=not use_kernel,
    )(query, key, value, cache["key"], cache["value"], masked, window, logical)
    return out, {"key": cache_key, "value": cache_value}

  def move_slots(self, cache: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
    """cache[b, target[b, i]] = cache[b, source[b, i]] in logical slots, on
    a round-robin cache sharded as `cache_sharding` ([batch, cache_len, ...]).

    Each device contributes the source entries it holds (zeros elsewhere), a
    psum over the axis gives every device all of them (batch x n entries,
    not the cache), and each writes the targets it holds. What speculative
    decoding needs to keep the accepted draft's K/V after the context.
    """
    num_shards, axis, rows = self.num_shards, self.axis, self.batch_axis
    local_len = cache.shape[1] // num_shards

    def per_device(cache, source, target):
      shard = lax.axis_index(axis)
      row = jnp.arange(cache.shape[0])[:, None]
      mine = source % num_shards == shard
      taken = cache[row, jnp.where(mine, source // num_shards, 0)]  # [b, n, ...]
      expand = (slice(None), slice(None)) + (None,) * (cache.ndim - 2)
      taken = jnp.where(mine[expand], taken, jnp.zeros_like(taken))
      entries = lax.psum(taken, axis)
      local = jnp.where(target % num_shards == shard, target // num_shards, local_len)
      return cache.at[row, local].set(entries, mode="drop")

    return jax.shard_map(
      per_device,
      mesh=self.mesh,
      in_specs=(P(rows, axis), P(rows), P(rows)),
      out_specs=P(rows, axis),
    )(cache, source, target)
