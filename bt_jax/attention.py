"""The one attention dispatch point of the models.

`dot_product_attention(..., impl=...)` routes to
  - "xla":    plain jnp einsum/softmax (f32 softmax), runs everywhere;
  - "pallas": `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU,
              the XLA reference path on CPU);
  - "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
Shapes: query [batch, q_len, heads, head_dim]; key/value
[batch, kv_len, kv_heads, head_dim] with kv_heads dividing heads.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from bt_jax.config import ATTENTION_IMPLS


def attention_mask(q_len: int, kv_len: int, *, causal: bool,
                   local_block: Optional[int] = None) -> jax.Array:
  """Static boolean [q_len, kv_len] mask (bottom-right aligned when causal)."""
  q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  k_pos = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((q_len, kv_len), dtype=bool)
  if causal:
    mask &= k_pos <= q_pos
  if local_block is not None:
    mask &= (k_pos // local_block) == (q_pos // local_block)
  return mask


def visible_window(mask: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
  """(starts, ends) int32 [batch]: the first visible slot and one past the last.

  mask [batch|1, slots] bool; a row with no True slot gives 0, 0. The window
  covers the row's True slots exactly only when they form one contiguous run,
  which `mask_is_window` checks.
  """
  mask = mask.astype(bool)
  slots = mask.shape[-1]
  seen = jnp.any(mask, axis=-1)
  first = jnp.argmax(mask, axis=-1)
  last_plus_one = slots - jnp.argmax(mask[:, ::-1], axis=-1)
  starts = jnp.where(seen, first, 0).astype(jnp.int32)
  ends = jnp.where(seen, last_plus_one, 0).astype(jnp.int32)
  return jnp.broadcast_to(starts, (batch,)), jnp.broadcast_to(ends, (batch,))


def mask_is_window(mask: jax.Array, starts: jax.Array, ends: jax.Array) -> jax.Array:
  """Scalar bool: every row's True slots are exactly [starts, ends).

  mask [batch|1, slots]; starts/ends from `visible_window`. False when some
  row's run has a hole, i.e. when the window would attend masked slots.
  """
  count = jnp.sum(mask.astype(jnp.int32), axis=-1)
  return jnp.all(count == ends - starts)


def split_context_and_new(mask: jax.Array, cache_index, length: int, batch: int):
  """Splits a cached multi-query mask into a context window and a new-token part.

  mask [batch|1, length, read_len] over cache slots; the `length` queries'
  own keys were just written at slots cache_index .. cache_index + length - 1
  (cache_index scalar or int32 [batch]). Returns (starts, ends, new_mask, ok):
  starts/ends int32 [batch], the window of context slots (< cache_index) the
  queries see; new_mask bool [batch, length, length], what each query sees of
  the new keys (a tree mask for speculative verification, causal for a chunk);
  ok, a scalar bool: the mask is exactly that, i.e. every query sees the same
  one contiguous run of context slots and nothing past the new keys. Then
  attention = merge(window attention over the cache, attention over the new
  keys under new_mask) (`bt_jax.distributed.merge.merge_pair`).
  """
  mask = jnp.broadcast_to(mask.astype(bool), (batch,) + mask.shape[1:])
  read_len = mask.shape[-1]
  index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (batch,))
  slots = jnp.arange(read_len)[None, None, :]
  context = mask & (slots < index[:, None, None])
  starts, ends = visible_window(context[:, 0], batch)
  new_slots = index[:, None] + jnp.arange(length)[None, :]                 # [batch, length]
  readable = new_slots < read_len
  new_mask = jnp.take_along_axis(
      mask, jnp.broadcast_to(jnp.minimum(new_slots, read_len - 1)[:, None, :],
                             (batch, length, length)), axis=2) & readable[:, None, :]
  beyond = slots >= (index + length)[:, None, None]
  ok = (mask_is_window(context[:, 0], starts, ends)
        & jnp.all(context == context[:, :1]) & ~jnp.any(mask & beyond))
  return starts, ends, new_mask, ok


def xla_attention_with_lse(query, key, value, *, causal: bool = False,
                           local_block: Optional[int] = None, mask: Optional[jax.Array] = None,
                           scale: Optional[float] = None):
  """Reference attention in jnp, returning (out f32, lse f32).

  out [batch, q_len, heads, head_dim]; lse [batch, heads, q_len], the natural
  log-sum-exp of the scaled, masked scores. A row that sees no key gives
  out = 0 and lse = -inf, never NaN (so partials over key shards merge).
  `mask` is boolean [batch|1, q_len, kv_len].
  """
  batch, q_len, heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  groups = heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  # [batch, q_len, kv_heads, groups, head_dim]: GQA without repeating K/V.
  q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, key,
                      preferred_element_type=jnp.float32) * scale
  full_mask = attention_mask(q_len, kv_len, causal=causal, local_block=local_block)[None]
  if mask is not None:
    full_mask = full_mask & mask
  full_mask = full_mask[:, None, None]  # [batch|1, 1, 1, q_len, kv_len]
  scores = jnp.where(full_mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(scores - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  probs = weights / safe_denom
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  lse = jnp.where(denom > 0, row_max + jnp.log(safe_denom), -jnp.inf)   # [b, h, g, q, 1]
  return out.reshape(batch, q_len, heads, head_dim), lse.reshape(batch, heads, q_len)


def xla_attention(query, key, value, *, causal: bool, local_block: Optional[int] = None,
                  mask: Optional[jax.Array] = None, scale: Optional[float] = None):
  """Reference attention in jnp (f32 softmax). `mask` is boolean [batch, q_len, kv_len].
  A fully masked row gives zeros, never NaN."""
  out, _ = xla_attention_with_lse(query, key, value, causal=causal, local_block=local_block,
                                  mask=mask, scale=scale)
  return out.astype(query.dtype)


def dot_product_attention(query, key, value, *, causal: bool, impl: str = "xla",
                          local_block: Optional[int] = None,
                          mask: Optional[jax.Array] = None) -> jax.Array:
  """Attention through the implementation named by `impl`."""
  if impl == "xla":
    return xla_attention(query, key, value, causal=causal, local_block=local_block, mask=mask)
  if impl == "pallas":
    import pallas_kernels  # pylint: disable=import-outside-toplevel
    return pallas_kernels.flash_attention(query, key, value, causal=causal,
                                          local_block=local_block, mask=mask)
  if impl == "cudnn":
    if local_block is not None:
      full = attention_mask(query.shape[1], key.shape[1], causal=causal,
                            local_block=local_block)[None]
      mask = full if mask is None else (mask & full)
      causal = False
    # jax.nn.dot_product_attention takes mask [batch, heads, q, k] (broadcastable).
    nn_mask = None if mask is None else mask[:, None]
    return jax.nn.dot_product_attention(query, key, value, mask=nn_mask, is_causal=causal,
                                        implementation="cudnn")
  raise ValueError(f"unknown attention_impl {impl!r}; valid values are {list(ATTENTION_IMPLS)}")
