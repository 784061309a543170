"""The one attention operator of the models: every kernel choice is made here.

This is the only module of `bt_jax` that imports `pallas_kernels`.

`attend(query, key, value, *, mask, cache, cache_index, window, impl, sharding)`
is what `bt_jax.layers.Attention` calls after its projections and rotary; it
picks the path from (impl, query count, cached, sharded) by one table, written
in docs/inference.md ("Attention paths"). Without a cache it is
`dot_product_attention(..., impl=...)`:
  - "xla":    plain jnp einsum/softmax (f32 softmax), runs everywhere;
  - "pallas": `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU);
              on a CPU backend it runs the jnp reference instead and says so
              once per process (a `KernelFallbackWarning`), never silently;
  - "pallas_interpret": the same Pallas kernels run by the Pallas
              interpreter (any backend; slow, for tests);
  - "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
Shapes: query [batch, q_len, heads, head_dim]; key/value
[batch, kv_len, kv_heads, head_dim] with kv_heads dividing heads.

Cache windows. A decoder that knows which cache slots each row sees passes
`window=(starts, ends)`, int32 [batch]: row b's queries see exactly the cache
slots [starts[b], ends[b]) (`ends` is an exclusive end slot, as everywhere in
this library and in `pallas_kernels`; with starts = 0 it is the number of
visible slots). For a step of one query that run includes the query's own
slot; for a step of several queries it is the context they all share (slots
before cache_index), and what they see of their own new keys is read from
`mask`. With a window, "pallas"/"pallas_interpret" run the split-KV decode
kernel over it; without one (a mask that is not one run per row) the masked
jnp path runs, so any mask stays exact.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import reference as kernel_reference
from bt_jax.config import ATTENTION_IMPLS

# The impls that run the Pallas kernels (on a GPU/TPU, or interpreted).
KERNEL_IMPLS = ("pallas", "pallas_interpret")
# The most queries a cached multi-query step sends to the decode kernel (one
# tile of rows per head); more take the masked jnp path.
MAX_SPLIT_QUERIES = 128
# Tiles of the decode kernel in interpret mode: small, so that the small
# shapes of CPU tests cross tile boundaries (the kernels' default elsewhere).
INTERPRET_DECODE_BLOCK_K = 16

Window = Tuple[jax.Array, jax.Array]


class KernelFallbackWarning(UserWarning):
  """impl="pallas" on a backend without Pallas kernels ran the jnp reference."""


_warned_fallback = False


def _warn_fallback_once(backend: str) -> None:
  global _warned_fallback
  if not _warned_fallback:
    _warned_fallback = True
    warnings.warn(
      f"attention impl 'pallas' has no Pallas kernels on the {backend!r} backend: it runs "
      "the XLA (jnp) reference instead. Use 'pallas_interpret' to run the kernels in "
      "the Pallas interpreter, or 'xla' to choose the reference explicitly. "
      "(Said once per process.)",
      KernelFallbackWarning,
      stacklevel=3,
    )


def kernel_impl(impl: Optional[str]) -> Optional[str]:
  """The `pallas_kernels` impl for an attention impl, decided at trace time.

  None: the kernels' auto choice (Pallas on GPU/TPU, jnp reference on CPU,
  silently: the caller asked for no kind). "xla": the jnp reference.
  "pallas": the compiled kernel on GPU/TPU; elsewhere the reference, with a
  `KernelFallbackWarning` once per process. "pallas_interpret": the kernel
  in the Pallas interpreter.
  """
  if impl is None or impl == "xla":
    return impl
  if impl == "pallas_interpret":
    return "interpret"
  if impl == "pallas":
    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
      return "pallas"
    _warn_fallback_once(backend)
    return "xla"
  raise ValueError(
    f"unknown attention impl {impl!r} for a kernel; valid values are "
    f"None, 'xla', {', '.join(repr(i) for i in KERNEL_IMPLS)}"
  )


def decode_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  ends: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  impl: Optional[str] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Split-KV decode attention: row b's queries see cache slots [starts[b], ends[b]).

  query [batch, q_len, heads, head_dim]; key/value [batch, slots, kv_heads,
  head_dim]; ends, starts (default 0) int32 [batch]. Returns (out in
  query.dtype, lse [batch, heads, q_len] f32); an empty run gives 0, -inf.
  impl as `kernel_impl`. The only way into `pallas_kernels.decode_attention`.
  """
  kernel = kernel_impl(impl)
  block_k = INTERPRET_DECODE_BLOCK_K if kernel == "interpret" else None
  return pallas_kernels.decode_attention(
    query, key, value, ends, starts=starts, sm_scale=sm_scale, impl=kernel, block_k=block_k
  )


def attention_mask(
  q_len: int, kv_len: int, *, causal: bool, local_block: Optional[int] = None
) -> jax.Array:
  """Static boolean [q_len, kv_len] mask (bottom-right aligned when causal)."""
  q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  k_pos = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((q_len, kv_len), dtype=bool)
  if causal:
    mask &= k_pos <= q_pos
  if local_block is not None:
    mask &= (k_pos // local_block) == (q_pos // local_block)
  return mask


def window_mask(starts: jax.Array, ends: jax.Array, slots: int) -> jax.Array:
  """bool [batch, slots]: True on [starts[b], ends[b]), what a window means."""
  at = jnp.arange(slots)[None, :]
  return (at >= starts[:, None]) & (at < ends[:, None])


def new_keys_mask(mask: jax.Array, cache_index, length: int, batch: int) -> jax.Array:
  """What each of `length` queries sees of the keys written by its own step.

  mask [batch|1, length, read_len] over cache slots; the step's keys are at
  slots cache_index .. cache_index + length - 1 (cache_index scalar or int32
  [batch]). Returns bool [batch, length, length] (a tree mask for speculative
  verification, causal for a chunk); slots past read_len read as False.
  """
  mask = jnp.broadcast_to(mask.astype(bool), (batch,) + mask.shape[1:])
  read_len = mask.shape[-1]
  index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (batch,))
  new_slots = index[:, None] + jnp.arange(length)[None, :]  # [batch, length]
  readable = new_slots < read_len
  return (
    jnp.take_along_axis(
      mask,
      jnp.broadcast_to(jnp.minimum(new_slots, read_len - 1)[:, None, :], (batch, length, length)),
      axis=2,
    )
    & readable[:, None, :]
  )


def xla_attention_with_lse(
  query,
  key,
  value,
  *,
  causal: bool = False,
  local_block: Optional[int] = None,
  mask: Optional[jax.Array] = None,
  scale: Optional[float] = None,
):
  """Reference attention in jnp, returning (out f32, lse f32).

  out [batch, q_len, heads, head_dim]; lse [batch, heads, q_len], the natural
  log-sum-exp of the scaled, masked scores. A row that sees no key gives
  out = 0 and lse = -inf, never NaN (so partials over key shards merge).
  `mask` is boolean [batch|1, q_len, kv_len]. The math is
  `pallas_kernels.reference.masked_attention`, the kernels' reference too.
  """
  q_len, head_dim = query.shape[1], query.shape[3]
  kv_len = key.shape[1]
  scale = head_dim**-0.5 if scale is None else scale
  full_mask = attention_mask(q_len, kv_len, causal=causal, local_block=local_block)[None]
  if mask is not None:
    full_mask = full_mask & mask
  return kernel_reference.masked_attention(query, key, value, full_mask, scale)


def xla_attention(
  query,
  key,
  value,
  *,
  causal: bool,
  local_block: Optional[int] = None,
  mask: Optional[jax.Array] = None,
  scale: Optional[float] = None,
):
  """Reference attention in jnp (f32 softmax). `mask` is boolean [batch, q_len, kv_len].
  A fully masked row gives zeros, never NaN."""
  out, _ = xla_attention_with_lse(
    query, key, value, causal=causal, local_block=local_block, mask=mask, scale=scale
  )
  return out.astype(query.dtype)


def _check_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; valid values are {list(ATTENTION_IMPLS)}")


def dot_product_attention(
  query,
  key,
  value,
  *,
  causal: bool,
  impl: str = "xla",
  local_block: Optional[int] = None,
  mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Attention through the implementation named by `impl` (no cache)."""
  _check_impl(impl)
  if impl == "xla":
    return xla_attention(query, key, value, causal=causal, local_block=local_block, mask=mask)
  if impl in KERNEL_IMPLS:
    return pallas_kernels.flash_attention(
      query, key, value, causal=causal, local_block=local_block, mask=mask, impl=kernel_impl(impl)
    )
  # cudnn
  if local_block is not None:
    full = attention_mask(query.shape[1], key.shape[1], causal=causal, local_block=local_block)[
      None
    ]
    mask = full if mask is None else (mask & full)
    causal = False
  # jax.nn.dot_product_attention takes mask [batch, heads, q, k] (broadcastable).
  nn_mask = None if mask is None else mask[:, None]
  return jax.nn.dot_product_attention(
    query, key, value, mask=nn_mask, is_causal=causal, implementation="cudnn"
  )


def write_cache(cache: jax.Array, new: jax.Array, index) -> jax.Array:
  """cache [batch, slots, ...] with new [batch, q, ...] written at slots
  index .. index + q - 1: index a scalar, or int32 [batch] (one per row)."""
  new = new.astype(cache.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(
    cache, new, index
  )


def attend(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  *,
  mask: Optional[jax.Array] = None,
  causal: bool = False,
  local_block: Optional[int] = None,
  cache: Optional[dict] = None,
  cache_index=None,
  window: Optional[Window] = None,
  impl: str = "xla",
  sharding: Any = None,
) -> Tuple[jax.Array, Optional[dict]]:
  """The models' attention: every path and kernel choice; returns (out, new_cache).

  query [batch, length, heads, head_dim] (rotary applied); key/value
  [batch, kv_len, kv_heads, head_dim]: the keys/values of this call.

  Without `cache`: `dot_product_attention` under `mask` [batch|1, length,
  kv_len] (`causal`, `local_block` S: attention inside runs of S positions);
  new_cache is None.

  With `cache` ({"key", "value"}: [batch, cache_len, kv_heads, head_dim]) the
  new keys/values are written at slots cache_index .. cache_index + length - 1
  (cache_index: a scalar shared by the batch, or int32 [batch], a slot per
  row), the queries attend over the first read_len = mask.shape[-1] slots
  under `mask` [batch|1, length, read_len] (it encodes causality and
  padding; `causal` and `local_block` are not used), and new_cache is
  returned. `window` (starts, ends): see the module docstring; the decoders
  pass the one they built the mask from. `sharding` (a
  `bt_jax.distributed.ShardedKVCache`): the cache is sharded over its mesh
  axis and attended by Tree Attention (`ShardedKVCache.attend`).

  The paths (docs/inference.md has the same table); "kernel" is impl
  "pallas" or "pallas_interpret":
    cache | sharded | queries              | impl   | window | path
    no    |   -     | any                    | any    |   -    | dot_product_attention
    yes   |  no     | >1, cache_index int 0  | any    |   -    | prefill: dot_product_attention
                                                                 over the new keys only
    yes   |  no     | 1                      | kernel | given  | decode kernel over the window
    yes   |  no     | 2..MAX_SPLIT_QUERIES   | kernel | given  | decode kernel over the context
                                                                 window, lse-merged with jnp
                                                                 attention over the new keys
    yes   |  no     | otherwise              |        |        | masked jnp attention
    yes   |  yes    | 1                      | kernel | given  | per device: decode kernel over
                                                                 its part of the window; Tree
                                                                 Attention merge
    yes   |  yes    | otherwise              |        |        | per device: masked jnp; Tree
                                                                 Attention merge
  """
  _check_impl(impl)
  if cache is None:
    return dot_product_attention(
      query, key, value, causal=causal, impl=impl, mask=mask, local_block=local_block
    ), None
  if sharding is not None:
    return sharding.attend(query, key, value, cache, cache_index, mask, window=window, impl=impl)
  new_cache = {
    "key": write_cache(cache["key"], key, cache_index),
    "value": write_cache(cache["value"], value, cache_index),
  }
  length = query.shape[1]
  if isinstance(cache_index, int) and cache_index == 0 and length > 1:
    # Prefill into an empty cache: the queries see only the keys written
    # now, so attend over those (not the whole cache) through the
    # configured implementation (flash attention with "pallas"/"cudnn").
    out = dot_product_attention(
      query,
      key.astype(query.dtype),
      value.astype(query.dtype),
      causal=False,
      impl=impl,
      mask=jnp.broadcast_to(mask[..., :length], (query.shape[0], length, length)),
    )
    return out, new_cache
  use_kernel = impl in KERNEL_IMPLS and window is not None
  if use_kernel and length == 1:
    # The decode step: the split-KV decode kernel over each row's window
    # [start, end) (left padding, then the causal edge); it skips the tiles
    # outside it. The whole cache is passed (a slice would copy it every
    # step): tiles past each row's end are not read.
    starts, ends = window
    out, _ = decode_attention(
      query, new_cache["key"], new_cache["value"], ends, starts=starts, impl=impl
    )
    return out.astype(query.dtype), new_cache
  if use_kernel and length <= MAX_SPLIT_QUERIES:
    # A few queries with their own new keys (speculative verification of a
    # packed draft tree, a chunk): the decode kernel over the context window
    # every query shares, merged by lse with attention over the `length` new
    # keys under their own mask (tree or causal). The kernel holds all the
    # queries of a head in one tile: at most MAX_SPLIT_QUERIES rows.
    from bt_jax.distributed.merge import merge_pair  # pylint: disable=import-outside-toplevel

    starts, ends = window
    new_mask = new_keys_mask(mask, cache_index, length, query.shape[0])
    context_out, context_lse = decode_attention(
      query, new_cache["key"], new_cache["value"], ends, starts=starts, impl=impl
    )
    # The new keys as the cache holds them (its dtype), read in the query's.
    own_key = key.astype(cache["key"].dtype).astype(query.dtype)
    own_value = value.astype(cache["value"].dtype).astype(query.dtype)
    own_out, own_lse = xla_attention_with_lse(query, own_key, own_value, mask=new_mask)
    out, _ = merge_pair(context_out, context_lse, own_out, own_lse)
    return out.astype(query.dtype), new_cache
  # A few queries against a masked cache: the jnp path (any mask).
  read_len = mask.shape[-1]  # static: later slots are not read at all
  out = xla_attention(
    query,
    new_cache["key"][:, :read_len].astype(query.dtype),
    new_cache["value"][:, :read_len].astype(query.dtype),
    causal=False,
    mask=mask,
  )
  return out, new_cache
