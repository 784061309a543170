"""Flash attention: Pallas forward and backward kernels behind a custom_vjp.

Public entry point: `flash_attention`. Reference: `reference.reference_attention`
(the "xla" impl is that reference).

Kernels (one body each, lowered by Triton on GPU, Mosaic on TPU, or run by the
Pallas interpreter on CPU):
  * forward: grid over (q blocks, batch, heads); each program keeps its q tile
    and runs an online softmax over the kv tiles it can see, in the log2 domain
    (exp2 is one instruction on GPUs). It writes out and lse (natural log).
  * dq: same grid as the forward; recomputes p from the saved lse.
  * dk/dv: grid over (kv blocks, batch, kv heads); loops over the query heads of
    its GQA group and the q tiles that can see the kv tile, so GQA needs no
    repeated K/V and no reduction afterwards.
Each loop over tiles is split in two: tiles needing no mask (the bulk of a
causal or unmasked problem) skip the mask arithmetic entirely; only tiles on
the causal diagonal, padded tails, or with segment ids / explicit masks /
local blocks build the mask. Tiles nobody can see are never visited.

Arbitrary lengths: q/kv are zero-padded to whole tiles outside the custom_vjp
(so autodiff slices the padding off) and padded keys are masked by position.

Known limits: on TPU each program holds one head's whole K/V (forward, dq) or
the whole query length of a GQA group (dk/dv) in VMEM, which bounds the length
to a few thousand tokens; a long-context TPU version would move the kv loop
into the grid with scratch accumulators (as the shipped TPU flash attention
does). The TPU path is checked by the TPU interpreter and by lowering to
Mosaic on CPU, not yet on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import reference
from pallas_kernels._common import (
  LN2,
  LOG2E,
  MASK_VALUE,
  compiler_params,
  dot_nn,
  dot_nt,
  pad_axis,
  padded_head_dim,
  pick_block,
  resolve_impl,
  resolve_target,
  round_up,
)

__all__ = ["flash_attention"]


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Static description of one flash-attention problem (hashable)."""

  causal: bool
  local_block: Optional[int]
  sm_scale: float
  q_len: int  # true lengths (positions / causal offset use these)
  kv_len: int
  q_len_padded: int
  kv_len_padded: int
  block_q: int  # forward and dq tiles
  block_k: int
  block_q_dkv: int  # dk/dv tiles
  block_k_dkv: int
  group: int  # heads // kv_heads
  has_segment_ids: bool
  has_mask: bool
  target: str  # "gpu" (Triton / interpret) | "tpu" (Mosaic)
  interpret: bool
  num_warps: int
  num_stages: int
  num_warps_bwd: int
  num_stages_bwd: int

  @property
  def kv_padded(self) -> bool:
    return self.kv_len_padded != self.kv_len

  @property
  def offset(self) -> int:
    # Bottom-right causal alignment: query i sees key j iff j <= i + offset.
    return self.kv_len - self.q_len

  @property
  def always_masked(self) -> bool:
    """Masks that can cut any tile: no tile is known mask-free statically."""
    return self.has_segment_ids or self.has_mask or self.local_block is not None


def _cdiv(a, b: int):
  """ceil(a / b) for traced non-negative int32 scalars."""
  return lax.div(a + (b - 1), b)


# --------------------------------------------------------------------------
# Masks and tile ranges.
# --------------------------------------------------------------------------


def _block_index(positions, block: int):
  """positions // block for non-negative ints; a shift when block is 2**n
  (vector integer division is slow or unsupported on some backends)."""
  if block & (block - 1) == 0:
    return lax.shift_right_logical(positions, jnp.int32(block.bit_length() - 1))
  return lax.div(positions, jnp.int32(block))


def _tile_mask(
  cfg: FlashConfig,
  q_start,
  k_start,
  shape: Tuple[int, int],
  q_seg=None,
  kv_seg=None,
  explicit=None,
  keys_first: bool = False,
):
  """Boolean tile: may query q_start + r attend key k_start + c.

  shape is [q rows, keys] (or [keys, q rows] with keys_first, used by the
  dk/dv kernel which works on transposed scores). q_seg / kv_seg are segment
  ids shaped to broadcast against the tile ([rows, 1] and [1, keys], or the
  transpose), explicit the user mask tile (int, nonzero = allowed); each None
  when absent.
  """
  q_axis, k_axis = (1, 0) if keys_first else (0, 1)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
  allowed = k_pos < cfg.kv_len if cfg.kv_padded else None

  def both(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.causal:
    allowed = both(allowed, k_pos <= q_pos + cfg.offset)
  if cfg.local_block is not None:
    allowed = both(
      allowed, _block_index(q_pos, cfg.local_block) == _block_index(k_pos, cfg.local_block)
    )
  if q_seg is not None:
    allowed = both(allowed, jnp.logical_and(q_seg == kv_seg, q_seg != 0))
  if explicit is not None:
    allowed = both(allowed, explicit != 0)
  if allowed is None:
    allowed = q_pos >= 0  # all True; only reached for an empty masked range
  return allowed


def _kv_tile_range(cfg: FlashConfig, q_start, block_q: int, block_k: int):
  """For the q tile at q_start: kv tiles [lo, mid) need no mask, [mid, hi) do."""
  num_kv = cfg.kv_len_padded // block_k
  lo = jnp.int32(0)
  hi = jnp.int32(num_kv)
  if cfg.causal:
    last_visible = q_start + block_q + cfg.offset  # exclusive bound on keys
    hi = jnp.minimum(hi, _cdiv(jnp.maximum(last_visible, 0), block_k))
  if cfg.local_block is not None:
    s = cfg.local_block
    first_key = lax.div(q_start, s) * s
    end_key = (lax.div(q_start + block_q - 1, s) + 1) * s
    lo = jnp.maximum(lo, lax.div(first_key, block_k))
    hi = jnp.minimum(hi, _cdiv(end_key, block_k))
  hi = jnp.maximum(hi, lo)
  if cfg.always_masked:
    return lo, lo, hi
  full = cfg.kv_len // block_k  # tiles holding no padded keys
  mid = jnp.int32(full)
  if cfg.causal:
    # Keys <= q_start + offset are visible to every row of the tile.
    mid = jnp.minimum(mid, lax.div(jnp.maximum(q_start + cfg.offset + 1, 0), block_k))
  mid = jnp.clip(mid, lo, hi)
  return lo, mid, hi


def _q_tile_range(cfg: FlashConfig, k_start, block_q: int, block_k: int):
  """For the kv tile at k_start: q tiles [lo, mid) need a mask, [mid, hi) not."""
  num_q = cfg.q_len_padded // block_q
  lo = jnp.int32(0)
  hi = jnp.int32(num_q)
  if cfg.causal:
    first_row = jnp.maximum(k_start - cfg.offset, 0)
    lo = jnp.maximum(lo, lax.div(first_row, block_q))
  if cfg.local_block is not None:
    s = cfg.local_block
    first_row = lax.div(k_start, s) * s
    end_row = (lax.div(k_start + block_k - 1, s) + 1) * s
    lo = jnp.maximum(lo, lax.div(first_row, block_q))
    hi = jnp.minimum(hi, _cdiv(end_row, block_q))
  hi = jnp.maximum(hi, lo)
  if cfg.always_masked:
    return lo, hi, hi
  if cfg.causal:
    # Rows >= k_start + block_k - 1 - offset see the whole kv tile.
    mid = _cdiv(jnp.maximum(k_start + block_k - 1 - cfg.offset, 0), block_q)
  else:
    mid = lo
  if cfg.kv_padded:
    mid = jnp.where(k_start + block_k > cfg.kv_len, hi, mid)
  mid = jnp.clip(mid, lo, hi)
  return lo, mid, hi


# --------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------


def _fwd_kernel(
  q_ref,
  k_ref,
  v_ref,
  q_seg_ref,
  kv_seg_ref,
  mask_ref,
  o_ref,
  lse_ref,
  *,
  cfg: FlashConfig,
  q_axis: int,
):
  # q_ref/o_ref [block_q, d]; k_ref/v_ref [kv_len_padded, d];
  # q_seg_ref [block_q, 1]; kv_seg_ref [1, kv_len_padded];
  # mask_ref [block_q, kv_len_padded]; lse_ref [block_q, 1].
  block_q, block_k = cfg.block_q, cfg.block_k
  q_start = pl.program_id(q_axis) * block_q
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  scale = cfg.sm_scale * LOG2E  # scores in the log2 domain
  lo, mid, hi = _kv_tile_range(cfg, q_start, block_q, block_k)

  def body(kb, carry, masked: bool):
    acc, m_prev, l_prev = carry
    k_start = pl.multiple_of(kb * block_k, block_k)
    kv_slice = pl.ds(k_start, block_k)
    s = dot_nt(q, k_ref[kv_slice, :]) * scale  # [block_q, block_k]
    if masked:
      allowed = _tile_mask(
        cfg,
        q_start,
        k_start,
        (block_q, block_k),
        q_seg=q_seg,
        kv_seg=None if kv_seg_ref is None else kv_seg_ref[:, kv_slice],
        explicit=None if mask_ref is None else mask_ref[:, kv_slice],
      )
      s = jnp.where(allowed, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp2(s - m_next)
    if masked:
      # A row masked so far has m_next == MASK_VALUE and exp2(0) == 1.
      p = jnp.where(allowed, p, 0.0)
    alpha = jnp.exp2(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[kv_slice, :]
    acc = alpha * acc + dot_nn(p.astype(v.dtype), v)
    return acc, m_next, l_next

  head_dim = q_ref.shape[-1]
  carry = (
    jnp.zeros((block_q, head_dim), jnp.float32),
    jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
    jnp.zeros((block_q, 1), jnp.float32),
  )
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)
  acc, m_i, l_i = carry
  seen = l_i > 0.0  # False for a fully masked row: out 0, lse -inf
  l_safe = jnp.where(seen, l_i, 1.0)
  o_ref[...] = jnp.where(seen, acc / l_safe, 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  q_seg_ref,
  kv_seg_ref,
  mask_ref,
  do_ref,
  lse2_ref,
  delta_ref,
  dq_ref,
  *,
  cfg: FlashConfig,
  q_axis: int,
):
  # As _fwd_kernel; do_ref/dq_ref [block_q, d]; lse2_ref/delta_ref [block_q, 1]
  # (lse2 = lse * log2(e), +inf on fully masked rows so p == 0 there).
  block_q, block_k = cfg.block_q, cfg.block_k
  q_start = pl.program_id(q_axis) * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse2_ref[...]
  delta = delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  scale = cfg.sm_scale * LOG2E
  lo, mid, hi = _kv_tile_range(cfg, q_start, block_q, block_k)

  def body(kb, dq, masked: bool):
    k_start = pl.multiple_of(kb * block_k, block_k)
    kv_slice = pl.ds(k_start, block_k)
    k = k_ref[kv_slice, :]
    s = dot_nt(q, k) * scale
    if masked:
      allowed = _tile_mask(
        cfg,
        q_start,
        k_start,
        (block_q, block_k),
        q_seg=q_seg,
        kv_seg=None if kv_seg_ref is None else kv_seg_ref[:, kv_slice],
        explicit=None if mask_ref is None else mask_ref[:, kv_slice],
      )
      s = jnp.where(allowed, s, MASK_VALUE)
    p = jnp.exp2(s - lse2)
    dp = dot_nt(do, v_ref[kv_slice, :])
    ds = p * (dp - delta)
    return dq + dot_nn(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(lo, mid, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(mid, hi, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  q_seg_ref,
  kv_seg_ref,
  mask_ref,
  do_ref,
  lse2_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  cfg: FlashConfig,
  k_axis: int,
):
  # Works on transposed scores sT = k q^T [block_k, block_q], so every
  # register-held matmul operand (pT, dsT) is a left operand needing no
  # transpose (as in the Triton fused-attention tutorial).
  # k_ref/v_ref/dk_ref/dv_ref [block_k, d]. q_ref/do_ref hold the whole query
  # length for the `group` query heads of this kv head: [q_len_padded, group, d]
  # ("gpu" layout) or [group, q_len_padded, d] ("tpu"). lse2_ref/delta_ref
  # [group, 1, q_len_padded]; q_seg_ref [1, q_len_padded]; kv_seg_ref
  # [block_k, 1]; mask_ref (transposed) [block_k, q_len_padded].
  block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
  k_start = pl.program_id(k_axis) * block_k
  k = k_ref[...]
  v = v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
  scale = cfg.sm_scale * LOG2E
  lo, mid, hi = _q_tile_range(cfg, k_start, block_q, block_k)

  def rows(ref, g, q_slice):
    if cfg.target == "gpu":
      return ref[q_slice, g, :]
    return ref[g, q_slice, :]

  def body(qb, carry, g, masked: bool):
    dk, dv = carry
    q_start = pl.multiple_of(qb * block_q, block_q)
    q_slice = pl.ds(q_start, block_q)
    q = rows(q_ref, g, q_slice)
    do = rows(do_ref, g, q_slice)
    lse2 = lse2_ref[g, :, q_slice]  # [1, block_q]
    delta = delta_ref[g, :, q_slice]  # [1, block_q]
    s_t = dot_nt(k, q) * scale  # [block_k, block_q]
    if masked:
      allowed = _tile_mask(
        cfg,
        q_start,
        k_start,
        (block_k, block_q),
        keys_first=True,
        q_seg=None if q_seg_ref is None else q_seg_ref[:, q_slice],
        kv_seg=kv_seg,
        explicit=None if mask_ref is None else mask_ref[:, q_slice],
      )
      s_t = jnp.where(allowed, s_t, MASK_VALUE)
    p_t = jnp.exp2(s_t - lse2)
    dv = dv + dot_nn(p_t.astype(do.dtype), do)
    dp_t = dot_nt(v, do)  # [block_k, block_q]
    ds_t = p_t * (dp_t - delta)
    dk = dk + dot_nn(ds_t.astype(q.dtype), q)
    return dk, dv

  def head_body(g, carry):
    # Masked tiles come first here (the causal diagonal is at low q).
    carry = lax.fori_loop(lo, mid, functools.partial(body, g=g, masked=True), carry)
    return lax.fori_loop(mid, hi, functools.partial(body, g=g, masked=False), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  if cfg.group == 1:
    dk, dv = head_body(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, cfg.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------
# pallas_call wrappers. Arrays arrive padded and in the target's layout:
#   "gpu": q/out/do [b, tq, h, d], k/v [b, tk, kvh, d]
#   "tpu": q/out/do [b, h, tq, d], k/v [b, kvh, tk, d]
# lse-like arrays are [b, h, tq, 1]; q_seg [b, tq, 1]; kv_seg [b, 1, tk];
# mask [b, tq, tk] int.
# --------------------------------------------------------------------------


def _grid(cfg: FlashConfig, num_tiles: int, batch: int, heads: int):
  """Grid and an index-map adaptor taking (batch, head, tile) ids.

  On GPU the tile axis goes first (the fastest-launched one), so programs of
  one (batch, head) run together and share K/V in L2.
  """
  if cfg.target == "gpu":
    grid = (num_tiles, batch, heads)

    def adapt(fn):
      return lambda t, b, h: fn(b, h, t)

    tile_axis = 0
  else:
    grid = (batch, heads, num_tiles)

    def adapt(fn):
      return lambda b, h, t: fn(b, h, t)

    tile_axis = 2
  return grid, adapt, tile_axis


def _seq_spec(cfg, adapt, length_block, head_block, d, index):
  """BlockSpec for a [b, len, heads, d] ("gpu") / [b, heads, len, d] array.

  index(b, h, t) -> (len block index, head block index).
  """
  if cfg.target == "gpu":

    def imap(b, h, t):
      li, hi = index(b, h, t)
      return (b, li, hi, 0)

    return pl.BlockSpec((None, length_block, head_block, d), adapt(imap))

  def imap(b, h, t):
    li, hi = index(b, h, t)
    return (b, hi, li, 0)

  return pl.BlockSpec((None, head_block, length_block, d), adapt(imap))


def _fwd_call(cfg: FlashConfig, q, k, v, q_seg, kv_seg, mask):
  if cfg.target == "gpu":
    batch, _, heads, head_dim = q.shape
  else:
    batch, heads, _, head_dim = q.shape
  num_q = cfg.q_len_padded // cfg.block_q
  grid, adapt, q_axis = _grid(cfg, num_q, batch, heads)
  group = cfg.group
  q_spec = _seq_spec(cfg, adapt, cfg.block_q, None, head_dim, lambda b, h, t: (t, h))
  kv_spec = _seq_spec(
    cfg, adapt, cfg.kv_len_padded, None, head_dim, lambda b, h, t: (0, lax.div(h, group))
  )
  row_spec = pl.BlockSpec((None, None, cfg.block_q, 1), adapt(lambda b, h, t: (b, h, t, 0)))
  in_specs = [
    q_spec,
    kv_spec,
    kv_spec,
    None
    if q_seg is None
    else pl.BlockSpec((None, cfg.block_q, 1), adapt(lambda b, h, t: (b, t, 0))),
    None
    if kv_seg is None
    else pl.BlockSpec((None, 1, cfg.kv_len_padded), adapt(lambda b, h, t: (b, 0, 0))),
    None
    if mask is None
    else pl.BlockSpec((None, cfg.block_q, cfg.kv_len_padded), adapt(lambda b, h, t: (b, t, 0))),
  ]
  out_shape = [
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    jax.ShapeDtypeStruct((batch, heads, cfg.q_len_padded, 1), jnp.float32),
  ]
  return pl.pallas_call(
    functools.partial(_fwd_kernel, cfg=cfg, q_axis=q_axis),
    grid=grid,
    in_specs=in_specs,
    out_specs=[q_spec, row_spec],
    out_shape=out_shape,
    compiler_params=compiler_params(cfg.target, 3, cfg.num_warps, cfg.num_stages),
    interpret=cfg.interpret,
    name="flash_attention_fwd",
  )(q, k, v, q_seg, kv_seg, mask)


def _dq_call(cfg: FlashConfig, q, k, v, q_seg, kv_seg, mask, do, lse2, delta):
  if cfg.target == "gpu":
    batch, _, heads, head_dim = q.shape
  else:
    batch, heads, _, head_dim = q.shape
  num_q = cfg.q_len_padded // cfg.block_q
  grid, adapt, q_axis = _grid(cfg, num_q, batch, heads)
  group = cfg.group
  q_spec = _seq_spec(cfg, adapt, cfg.block_q, None, head_dim, lambda b, h, t: (t, h))
  kv_spec = _seq_spec(
    cfg, adapt, cfg.kv_len_padded, None, head_dim, lambda b, h, t: (0, lax.div(h, group))
  )
  row_spec = pl.BlockSpec((None, None, cfg.block_q, 1), adapt(lambda b, h, t: (b, h, t, 0)))
  in_specs = [
    q_spec,
    kv_spec,
    kv_spec,
    None
    if q_seg is None
    else pl.BlockSpec((None, cfg.block_q, 1), adapt(lambda b, h, t: (b, t, 0))),
    None
    if kv_seg is None
    else pl.BlockSpec((None, 1, cfg.kv_len_padded), adapt(lambda b, h, t: (b, 0, 0))),
    None
    if mask is None
    else pl.BlockSpec((None, cfg.block_q, cfg.kv_len_padded), adapt(lambda b, h, t: (b, t, 0))),
    q_spec,
    row_spec,
    row_spec,
  ]
  return pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, q_axis=q_axis),
    grid=grid,
    in_specs=in_specs,
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=compiler_params(cfg.target, 3, cfg.num_warps_bwd, cfg.num_stages_bwd),
    interpret=cfg.interpret,
    name="flash_attention_dq",
  )(q, k, v, q_seg, kv_seg, mask, do, lse2, delta)


def _dkv_call(cfg: FlashConfig, q, k, v, q_seg, kv_seg, mask, do, lse2, delta):
  # Row vectors as [.., 1, len] (free reshapes of [.., len, 1]); the explicit
  # mask transposed to [b, tk, tq] to match the transposed score tiles.
  lse2 = lse2.reshape(lse2.shape[0], lse2.shape[1], 1, lse2.shape[2])
  delta = delta.reshape(lse2.shape)
  if q_seg is not None:
    q_seg = q_seg.reshape(q_seg.shape[0], 1, q_seg.shape[1])
    kv_seg = kv_seg.reshape(kv_seg.shape[0], kv_seg.shape[2], 1)
  if mask is not None:
    mask = jnp.swapaxes(mask, 1, 2)
  if cfg.target == "gpu":
    batch, _, kv_heads, head_dim = k.shape
  else:
    batch, kv_heads, _, head_dim = k.shape
  num_k = cfg.kv_len_padded // cfg.block_k_dkv
  grid, adapt, k_axis = _grid(cfg, num_k, batch, kv_heads)
  group = cfg.group
  kv_spec = _seq_spec(cfg, adapt, cfg.block_k_dkv, None, head_dim, lambda b, h, t: (t, h))
  # All query rows of the `group` query heads that read kv head h.
  q_spec = _seq_spec(cfg, adapt, cfg.q_len_padded, group, head_dim, lambda b, h, t: (0, h))
  rows_spec = pl.BlockSpec((None, group, 1, cfg.q_len_padded), adapt(lambda b, h, t: (b, h, 0, 0)))
  in_specs = [
    q_spec,
    kv_spec,
    kv_spec,
    None
    if q_seg is None
    else pl.BlockSpec((None, 1, cfg.q_len_padded), adapt(lambda b, h, t: (b, 0, 0))),
    None
    if kv_seg is None
    else pl.BlockSpec((None, cfg.block_k_dkv, 1), adapt(lambda b, h, t: (b, t, 0))),
    None
    if mask is None
    else pl.BlockSpec((None, cfg.block_k_dkv, cfg.q_len_padded), adapt(lambda b, h, t: (b, t, 0))),
    q_spec,
    rows_spec,
    rows_spec,
  ]
  return pl.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg, k_axis=k_axis),
    grid=grid,
    in_specs=in_specs,
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=compiler_params(cfg.target, 3, cfg.num_warps_bwd, cfg.num_stages_bwd),
    interpret=cfg.interpret,
    name="flash_attention_dkv",
  )(q, k, v, q_seg, kv_seg, mask, do, lse2, delta)


# --------------------------------------------------------------------------
# custom_vjp over padded, target-layout arrays.
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(cfg, q, k, v, q_seg, kv_seg, mask):
  out, lse = _fwd_call(cfg, q, k, v, q_seg, kv_seg, mask)
  return out, lse


def _flash_core_fwd(cfg, q, k, v, q_seg, kv_seg, mask):
  out, lse = _fwd_call(cfg, q, k, v, q_seg, kv_seg, mask)
  return (out, lse), (q, k, v, q_seg, kv_seg, mask, out, lse)


def _flash_core_bwd(cfg, residuals, cotangents):
  q, k, v, q_seg, kv_seg, mask, out, lse = residuals
  d_out, d_lse = cotangents  # d_lse [b, h, tq, 1]
  d_out = d_out.astype(q.dtype)
  # delta_i = sum_d out_i * dout_i; the lse cotangent enters as -d_lse because
  # d lse_i / d s_ij = p_ij: ds = p * (dp - (delta - d_lse)).
  out_dot_dout = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  if cfg.target == "gpu":
    out_dot_dout = jnp.swapaxes(out_dot_dout, 1, 2)  # [b, tq, h] -> [b, h, tq]
  delta = out_dot_dout[..., None] - d_lse.astype(jnp.float32)
  lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)
  dq = _dq_call(cfg, q, k, v, q_seg, kv_seg, mask, d_out, lse2, delta)
  dk, dv = _dkv_call(cfg, q, k, v, q_seg, kv_seg, mask, d_out, lse2, delta)
  return dq, dk, dv, None, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tuning:
  block_q: int  # forward and dq kernels
  block_k: int
  block_q_dkv: int  # dk/dv kernel
  block_k_dkv: int
  num_warps: int
  num_stages: int
  num_warps_bwd: int
  num_stages_bwd: int


def _default_tuning(target: str, head_dim: int) -> _Tuning:
  """Per-backend tiles. GPU numbers follow the Triton fused-attention tutorial
  for H100 (dk/dv: narrow q tiles against wide kv tiles); at head_dim > 64 the
  dk/dv accumulators would spill registers, so tiles shrink and warps double.
  Untuned beyond that: override with the block_* arguments."""
  if target == "tpu":
    return _Tuning(128, 128, 128, 128, 4, 2, 4, 2)  # warps/stages unused
  if head_dim <= 64:
    return _Tuning(128, 64, 32, 128, 4, 3, 4, 3)
  return _Tuning(128, 64, 64, 64, 8, 2, 8, 2)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = False,
  local_block: Optional[int] = None,
  segment_ids=None,
  mask: Optional[jax.Array] = None,
  return_lse: bool = False,
  sm_scale: Optional[float] = None,
  impl: Optional[str] = None,
  block_q: Optional[int] = None,
  block_k: Optional[int] = None,
  block_q_dkv: Optional[int] = None,
  block_k_dkv: Optional[int] = None,
):
  """Memory-efficient masked attention, differentiable (custom_vjp).

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, kv_len, kv_heads, head_dim]`; kv_heads divides heads and
      query head h reads kv head h // (heads // kv_heads).
    causal: query i sees key j iff j <= i + (kv_len - q_len) (bottom-right).
    local_block: S -> query i sees key j only if i // S == j // S (needs
      q_len == kv_len); combined with `causal` it is causal inside each block.
    segment_ids: int `[batch, len]` for q and kv, or a pair
      `(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`; attend
      only where ids are equal and nonzero (0 = padding).
    mask: bool `[batch, q_len, kv_len]`, True = may attend.
    return_lse: also return lse `[batch, heads, q_len]` float32 (natural log of
      the sum of exp of the scaled masked scores; -inf on fully masked rows).
    sm_scale: score scale, default head_dim ** -0.5.
    impl: None (auto: "pallas" on gpu/tpu, "xla" on cpu) | "pallas" |
      "interpret" | "xla".
    block_q, block_k: tile sizes (powers of two >= 16) of the forward and dq
      kernels; also of the dk/dv kernel unless block_q_dkv / block_k_dkv are
      given. Defaults per backend and head_dim (see _default_tuning).

  Returns:
    out `[batch, q_len, heads, head_dim]` in q.dtype, or (out, lse).
  All masks AND together; a fully masked row gives zeros and lse = -inf.
  """
  reference.check_attention_shapes(q, k, v)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if sm_scale is None:
    sm_scale = head_dim**-0.5
  if local_block is not None:
    if q_len != kv_len:
      raise ValueError(f"local_block needs q_len == kv_len; got q_len={q_len}, kv_len={kv_len}")
    if int(local_block) <= 0:
      raise ValueError(f"local_block must be a positive int; got {local_block}")
    local_block = int(local_block)
  if mask is not None and mask.shape != (batch, q_len, kv_len):
    raise ValueError(
      f"mask must be [batch, q_len, kv_len] = {(batch, q_len, kv_len)}; got {mask.shape}"
    )
  q_seg, kv_seg = reference.split_segment_ids(segment_ids, q_len, kv_len)
  impl = resolve_impl(impl)
  if impl == "xla":
    out, lse = reference.reference_attention(
      q,
      k,
      v,
      causal=causal,
      local_block=local_block,
      segment_ids=None if q_seg is None else (q_seg, kv_seg),
      mask=mask,
      sm_scale=sm_scale,
    )
    return (out, lse) if return_lse else out

  target = resolve_target(impl)
  tuning = _default_tuning(target, head_dim)
  bq = pick_block(block_q, tuning.block_q, q_len)
  bk = pick_block(block_k, tuning.block_k, kv_len)
  bq_dkv = pick_block(block_q if block_q_dkv is None else block_q_dkv, tuning.block_q_dkv, q_len)
  bk_dkv = pick_block(block_k if block_k_dkv is None else block_k_dkv, tuning.block_k_dkv, kv_len)
  q_len_p = round_up(q_len, max(bq, bq_dkv))
  kv_len_p = round_up(kv_len, max(bk, bk_dkv))
  d_p = padded_head_dim(head_dim, target)
  cfg = FlashConfig(
    causal=bool(causal),
    local_block=local_block,
    sm_scale=float(sm_scale),
    q_len=q_len,
    kv_len=kv_len,
    q_len_padded=q_len_p,
    kv_len_padded=kv_len_p,
    block_q=bq,
    block_k=bk,
    block_q_dkv=bq_dkv,
    block_k_dkv=bk_dkv,
    group=heads // kv_heads,
    has_segment_ids=q_seg is not None,
    has_mask=mask is not None,
    target=target,
    interpret=impl == "interpret",
    num_warps=tuning.num_warps,
    num_stages=tuning.num_stages,
    num_warps_bwd=tuning.num_warps_bwd,
    num_stages_bwd=tuning.num_stages_bwd,
  )

  # One dtype for the matmul operands (mixed-dtype dots do not lower on Triton).
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  # Pad to whole tiles; padded keys are masked by position, padded queries are
  # sliced off (their cotangents are zero, so they add nothing to dk/dv).
  qp = pad_axis(pad_axis(q, 1, q_len_p), 3, d_p)
  kp = pad_axis(pad_axis(k, 1, kv_len_p), 3, d_p)
  vp = pad_axis(pad_axis(v, 1, kv_len_p), 3, d_p)
  if target == "tpu":
    qp, kp, vp = (jnp.swapaxes(x, 1, 2) for x in (qp, kp, vp))
  q_seg_p = None if q_seg is None else pad_axis(q_seg, 1, q_len_p)[:, :, None]
  kv_seg_p = None if kv_seg is None else pad_axis(kv_seg, 1, kv_len_p)[:, None, :]
  mask_p = None
  if mask is not None:
    # int8 halves/quarters the bytes on GPU; Mosaic tiles int32 most simply.
    mask_dtype = jnp.int8 if target == "gpu" else jnp.int32
    mask_p = pad_axis(pad_axis(mask.astype(mask_dtype), 1, q_len_p), 2, kv_len_p)

  out, lse = _flash_core(cfg, qp, kp, vp, q_seg_p, kv_seg_p, mask_p)
  if target == "tpu":
    out = jnp.swapaxes(out, 1, 2)
  out = out[:, :q_len, :, :head_dim]
  if not return_lse:
    return out
  return out, lse[:, :, :q_len, 0]
