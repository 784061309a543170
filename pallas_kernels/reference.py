"""Pure-jnp references for the Pallas attention kernels.

Every kernel in this package has its reference here; the tests compare the
kernels against these (outputs, log-sum-exp and gradients) and the "xla"
implementation of the public functions is exactly this code. All of them
run `masked_attention`, which is also the models' "xla" attention
(`bt_jax.attention.xla_attention_with_lse`): one jnp masked GQA attention.

Layout: q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads,
head_dim]` with kv_heads dividing heads (query head h reads kv head
h // (heads // kv_heads)). Softmax math is float32 whatever the input dtype;
the matmuls take the inputs' dtype and accumulate in float32.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

SegmentIds = Union[jax.Array, Tuple[jax.Array, jax.Array]]


def check_attention_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises ValueError naming the bad shape when q/k/v do not fit together."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q, k, v must be [batch, len, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}"
    )
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must agree on batch and head_dim; got q {q.shape} and k {k.shape}")
  if q.shape[2] % k.shape[2] != 0:
    raise ValueError(f"kv_heads={k.shape[2]} must divide heads={q.shape[2]} (GQA)")


def split_segment_ids(
  segment_ids: Optional[SegmentIds], q_len: int, kv_len: int
) -> Tuple[Optional[jax.Array], Optional[jax.Array]]:
  """Returns (q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
        "segment_ids must be one array or a (q_segment_ids, kv_segment_ids) "
        f"pair; got a sequence of length {len(segment_ids)}"
      )
    q_seg, kv_seg = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(
        "a single segment_ids array needs q_len == kv_len; got "
        f"q_len={q_len}, kv_len={kv_len}; pass (q_segment_ids, kv_segment_ids)"
      )
    q_seg = kv_seg = segment_ids
  q_seg = jnp.asarray(q_seg, jnp.int32)
  kv_seg = jnp.asarray(kv_seg, jnp.int32)
  if q_seg.ndim != 2 or q_seg.shape[1] != q_len:
    raise ValueError(f"q_segment_ids must be [batch, {q_len}]; got {q_seg.shape}")
  if kv_seg.ndim != 2 or kv_seg.shape[1] != kv_len:
    raise ValueError(f"kv_segment_ids must be [batch, {kv_len}]; got {kv_seg.shape}")
  return q_seg, kv_seg


def attention_mask(
  batch: int,
  q_len: int,
  kv_len: int,
  *,
  causal: bool = False,
  local_block: Optional[int] = None,
  segment_ids: Optional[SegmentIds] = None,
  mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Boolean `[batch, q_len, kv_len]`: True where query i may attend key j."""
  q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None]
  kv_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  allowed = jnp.ones((batch, q_len, kv_len), dtype=bool)
  if causal:
    # Bottom-right aligned (flash-attn convention): the last query sees all keys.
    allowed &= (kv_pos <= q_pos + (kv_len - q_len))[None]
  if local_block is not None:
    if q_len != kv_len:
      raise ValueError(f"local_block needs q_len == kv_len; got q_len={q_len}, kv_len={kv_len}")
    if local_block <= 0:
      raise ValueError(f"local_block must be a positive int; got {local_block}")
    allowed &= (q_pos // local_block == kv_pos // local_block)[None]
  q_seg, kv_seg = split_segment_ids(segment_ids, q_len, kv_len)
  if q_seg is not None:
    allowed &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
  if mask is not None:
    if mask.shape != (batch, q_len, kv_len):
      raise ValueError(
        f"mask must be [batch, q_len, kv_len] = {(batch, q_len, kv_len)}; got {mask.shape}"
      )
    allowed &= mask.astype(bool)
  return allowed


def masked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, sm_scale: float
) -> Tuple[jax.Array, jax.Array]:
  """The one jnp masked GQA attention: the models' "xla" path and every reference here.

  q [b, t, h, d], k/v [b, s, kvh, d] (GQA without repeating K/V), allowed
  bool [b|1, t, s]. Returns out [b, t, h, d] float32 and lse [b, h, t]
  float32 (natural log). Scores are the inputs' dot products accumulated in
  float32, the softmax is float32 and the probabilities are cast to v's
  dtype for the second matmul (so bf16 inputs run bf16 matmuls with f32
  accumulation, like the kernels). A row that sees no key gives out = 0 and
  lse = -inf, never NaN (so partials over key shards merge).
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  # [batch, q_len, kv_heads, groups, head_dim]: GQA without repeating K/V.
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * sm_scale
  allowed = allowed[:, None, None]  # [batch|1, 1, 1, q_len, kv_len]
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(scores - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  probs = weights / safe_denom
  out = jnp.einsum(
    "bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  lse = jnp.where(denom > 0, row_max + jnp.log(safe_denom), -jnp.inf)  # [b, h, g, q, 1]
  return out.reshape(batch, q_len, heads, head_dim), lse.reshape(batch, heads, q_len)


def _masked_softmax_attention(q, k, v, allowed, sm_scale):
  """`masked_attention` with out in q.dtype."""
  out, lse = masked_attention(q, k, v, allowed, sm_scale)
  return out.astype(q.dtype), lse


def reference_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = False,
  local_block: Optional[int] = None,
  segment_ids: Optional[SegmentIds] = None,
  mask: Optional[jax.Array] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Masked multi-head attention in plain jnp.

  Returns out `[batch, q_len, heads, head_dim]` (q.dtype) and lse
  `[batch, heads, q_len]` float32 (natural log of the sum of exp of the scaled,
  masked scores; -inf for a fully masked row, whose output is zeros).
  """
  check_attention_shapes(q, k, v)
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  if sm_scale is None:
    sm_scale = head_dim**-0.5
  allowed = attention_mask(
    batch, q_len, kv_len, causal=causal, local_block=local_block, segment_ids=segment_ids, mask=mask
  )
  return _masked_softmax_attention(q, k, v, allowed, sm_scale)


def reference_decode_attention(
  q: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  ends: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  sm_scale: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Decode attention over a KV cache in plain jnp.

  q `[batch, q_len, heads, head_dim]`, caches `[batch, kv_len, kv_heads,
  head_dim]`, ends (exclusive) and starts (default zeros) int32 `[batch]`:
  every query token of row b sees keys [starts[b], ends[b]). Returns out
  `[batch, q_len, heads, head_dim]` (q.dtype) and lse `[batch, heads, q_len]`
  float32 natural log; an empty range gives zeros and lse -inf.
  """
  check_attention_shapes(q, k_cache, v_cache)
  batch, q_len, _, head_dim = q.shape
  kv_len = k_cache.shape[1]
  lengths = jnp.asarray(ends, jnp.int32)
  if lengths.shape != (batch,):
    raise ValueError(f"ends must be int32 [batch={batch}]; got {lengths.shape}")
  if sm_scale is None:
    sm_scale = head_dim**-0.5
  kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
  visible = kv_pos[None, :] < lengths[:, None]  # [batch, kv_len]
  if starts is not None:
    starts = jnp.asarray(starts, jnp.int32)
    if starts.shape != (batch,):
      raise ValueError(f"starts must be int32 [batch={batch}]; got {starts.shape}")
    visible &= kv_pos[None, :] >= starts[:, None]
  allowed = jnp.broadcast_to(visible[:, None, :], (batch, q_len, kv_len))
  return _masked_softmax_attention(q, k_cache, v_cache, allowed, sm_scale)
