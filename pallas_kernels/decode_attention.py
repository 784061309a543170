"""Split-KV decode attention (flash-decoding) as a Pallas kernel.

Public entry point: `decode_attention`; reference:
`reference.reference_decode_attention` (the "xla" impl).

The kernel grid is (batch, kv_heads, splits) (on TPU with a fourth axis
walking the tiles of a split). Every (batch, kv head, split) takes the
`group * q_len` query rows that read one kv head (so GQA turns decode into a
real [rows, head_dim] x [head_dim, block_k] matmul and each K/V byte is read
once), runs an online softmax over its chunk of the cache, and writes a
normalised partial output and its natural-log lse. The partials are merged
with their lse (exact: out = sum_s exp(lse_s - lse) out_s,
lse = logsumexp_s lse_s), which is also how distributed tree decode merges the
per-device results of this function.

Row b attends over cache positions [starts[b], ends[b]) (`ends` exclusive;
starts default to 0, and then ends[b] is the number of valid positions; a
left-padded generation cache passes its per-row pad as starts). Inside the
kernels the per-row end is called `length`.

How the cache is chunked: on both targets chunks follow each row's actual
range (the tiles from starts[b] // block_k up to the one holding
lengths[b] - 1, split in `splits` equal runs of tiles), so a half-empty or
left-padded cache keeps every split busy and no tile wholly outside the range
is read.
  * "gpu" (Triton, and interpret on CPU): each program loops over its run of
    tiles, loading them from the whole cache row. The cache keeps the model's
    [batch, kv_len, kv_heads, head_dim] layout: no copy of the cache is made
    when kv_len is a multiple of block_k and head_dim a power of two.
  * "tpu" (Mosaic): BlockSpecs are static, so the grid is
    (batch, kv_heads, splits, ceil(tiles / splits)), one K and V tile per
    step, with m, l and the output accumulated in VMEM scratch along the
    last ("arbitrary") axis. lengths (and starts) are scalar-prefetched into
    SMEM and the K/V index map clamps each step's tile into the row's valid
    tiles, so steps past a split's run map to a tile already in VMEM and the
    pipeline fetches nothing for them (the trick of jax's paged attention
    kernels); they only pay the fixed cost of a grid step. An empty row
    still reads one tile per kv head. The cache is moved to
    [batch, kv_heads, kv_len, head_dim] (a copy of the whole cache per call)
    so blocks are tile-aligned.

Without `starts` the kernel is traced without them (no extra operand, no
extra mask): the lengths-only kernel is unchanged.
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

__all__ = ["decode_attention"]


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Static description of one decode-attention call (hashable)."""

  sm_scale: float
  block_k: int
  num_splits: int
  num_tiles: int  # cache tiles of block_k positions (padded kv_len)
  tiles_per_split: int  # "tpu": grid steps per split, ceil(tiles / splits)
  rows: int  # padded group * q_len
  target: str
  interpret: bool
  num_warps: int
  num_stages: int
  has_starts: bool  # False: positions start at 0 (no starts operand)


def _split_tiles(start, length, split, *, block_k: int, num_splits: int):
  """The tiles of one row and of one split of it.

  Row b's valid tiles are [first, end): those holding a position in
  [start, length) (start None: 0, traced without it). They are split in
  `num_splits` equal runs of ceil(valid / num_splits) tiles; split s takes
  [lo, hi), empty (hi == lo) past the end or for an empty row. starts and
  lengths are clamped to [0, kv_len] by the caller, so every division here is
  of a non-negative number.

  Returns (first, end, lo, hi) int32 scalars (end < first for some empty rows).
  """
  end_tile = lax.div(length + (block_k - 1), block_k)
  if start is None:
    first_tile, num_valid = jnp.int32(0), end_tile
  else:
    first_tile = lax.div(start, block_k)
    num_valid = jnp.maximum(end_tile - first_tile, 0)
  tiles_per_split = lax.div(num_valid + (num_splits - 1), num_splits)
  lo = first_tile + split * tiles_per_split  # first_tile 0: folded away
  hi = jnp.minimum(lo + tiles_per_split, end_tile)
  return first_tile, end_tile, lo, jnp.maximum(hi, lo)


def _tpu_kv_tile_index(start, length, split, t, *, block_k: int, num_splits: int, num_tiles: int):
  """The K/V tile that grid step (b, h, split, t) of the "tpu" kernel maps.

  Step t of a split computes tile lo + t while that is below hi
  (`_split_tiles`). Every other step maps to a tile a neighbouring step also
  holds: the index is clamped to the split's last tile and then into the
  row's valid tiles [first, end - 1], so along the grid of one (b, h) the
  index never decreases and takes exactly the valid tiles, each on a run of
  consecutive steps. The pipeline fetches a block only when its index
  changes, so the tiles wholly outside [start, length) are never read; an
  empty row still reads one tile per kv head (a block must be mapped). The
  final clamp to num_tiles - 1 keeps an empty row with start == padded
  kv_len in bounds.
  """
  first, end, lo, hi = _split_tiles(start, length, split, block_k=block_k, num_splits=num_splits)
  tile = jnp.minimum(lo + t, hi - 1)
  tile = jnp.clip(tile, first, jnp.maximum(end - 1, first))
  return jnp.minimum(tile, num_tiles - 1)


def _online_softmax_step(carry, q, k, v, position, start, length, scale):
  """One tile of the online softmax (base 2): q [rows, d], k/v [block_k, d],
  position int32 [rows, block_k]; carry (acc [rows, d], m [rows, 1],
  l [rows, 1]) f32. start None: no lower bound."""
  acc, m_prev, l_prev = carry
  s = dot_nt(q, k) * scale  # [rows, block_k]
  allowed = position < length
  if start is not None:
    allowed &= position >= start
  s = jnp.where(allowed, s, MASK_VALUE)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(allowed, jnp.exp2(s - m_next), 0.0)
  alpha = jnp.exp2(m_prev - m_next)
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + dot_nn(p.astype(v.dtype), v)
  return acc, m_next, l_next


def _finish(o_ref, lse_ref, acc, m_i, l_i):
  """Normalised partial out and natural-log lse; an empty split: out 0,
  lse -inf (weight 0 in the merge)."""
  seen = l_i > 0.0
  l_safe = jnp.where(seen, l_i, 1.0)
  o_ref[...] = jnp.where(seen, acc / l_safe, 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _initial_carry(rows: int, head_dim: int):
  return (
    jnp.zeros((rows, head_dim), jnp.float32),
    jnp.full((rows, 1), MASK_VALUE, jnp.float32),
    jnp.zeros((rows, 1), jnp.float32),
  )


def _gpu_decode_kernel(*refs, cfg: DecodeConfig):
  # [starts_ref,] lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref.
  # q_ref/o_ref [rows, d]; k_ref/v_ref [kv_len, d] (the whole cache row);
  # lse_ref [rows, 1]. Grid (batch, kv_heads, splits).
  if cfg.has_starts:
    starts_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    start = starts_ref[()]
  else:
    lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    start = None
  block_k = cfg.block_k
  length = lengths_ref[()]
  _, _, lo, hi = _split_tiles(
    start, length, pl.program_id(2), block_k=block_k, num_splits=cfg.num_splits
  )
  q = q_ref[...]
  rows = q.shape[0]
  scale = cfg.sm_scale * LOG2E

  def body(kb, carry):
    k_start = pl.multiple_of(kb * block_k, block_k)
    kv_slice = pl.ds(k_start, block_k)
    position = k_start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    return _online_softmax_step(
      carry, q, k_ref[kv_slice, :], v_ref[kv_slice, :], position, start, length, scale
    )

  acc, m_i, l_i = lax.fori_loop(lo, hi, body, _initial_carry(rows, q_ref.shape[-1]))
  _finish(o_ref, lse_ref, acc, m_i, l_i)


def _tpu_decode_kernel(*refs, cfg: DecodeConfig):
  # Scalar prefetch (SMEM, whole [batch]): [starts_ref,] lengths_ref; then
  # q_ref/o_ref [rows, d], k_ref/v_ref [block_k, d] (the tile of
  # `_tpu_kv_tile_index`), lse_ref [rows, 1]; scratch acc [rows, d],
  # m/l [rows, 1] f32. Grid (batch, kv_heads, splits, tiles_per_split).
  if cfg.has_starts:
    starts_ref, lengths_ref, *refs = refs
  else:
    starts_ref = None
    lengths_ref, *refs = refs
  q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
  block_k = cfg.block_k
  batch_index, t = pl.program_id(0), pl.program_id(3)
  length = lengths_ref[batch_index]
  start = starts_ref[batch_index] if cfg.has_starts else None
  _, _, lo, hi = _split_tiles(
    start, length, pl.program_id(2), block_k=block_k, num_splits=cfg.num_splits
  )
  tile = lo + t

  @pl.when(t == 0)
  def _init():
    acc, m_i, l_i = _initial_carry(*acc_ref.shape)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m_i, l_i

  @pl.when(tile < hi)  # then k_ref/v_ref hold this tile (see the index map)
  def _compute():
    q = q_ref[...]
    rows = q.shape[0]
    position = tile * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    acc, m_i, l_i = _online_softmax_step(
      (acc_ref[...], m_ref[...], l_ref[...]),
      q,
      k_ref[...],
      v_ref[...],
      position,
      start,
      length,
      cfg.sm_scale * LOG2E,
    )
    acc_ref[...], m_ref[...], l_ref[...] = acc, m_i, l_i

  @pl.when(t == cfg.tiles_per_split - 1)
  def _write():
    _finish(o_ref, lse_ref, acc_ref[...], m_ref[...], l_ref[...])


def _decode_call(cfg: DecodeConfig, starts, lengths, q_rows, k_cache, v_cache):
  """q_rows [b, kvh, rows, d]; caches in the target layout (see module doc);
  starts int32 [b] when cfg.has_starts, else None.

  Returns partial out [b, kvh, splits, rows, d] f32, lse [..., rows, 1] f32.
  """
  batch, kv_heads, rows, head_dim = q_rows.shape
  splits = cfg.num_splits
  # starts travel exactly like lengths.
  scalars = (starts, lengths) if cfg.has_starts else (lengths,)
  out_shape = [
    jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
    jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, 1), jnp.float32),
  ]
  if cfg.target == "tpu":
    return _tpu_decode_call(cfg, scalars, q_rows, k_cache, v_cache, out_shape)
  kv_len = k_cache.shape[1]
  lengths_spec = pl.BlockSpec((None,), lambda b, h, s: (b,))
  kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
  q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))
  o_spec = pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0))
  lse_spec = pl.BlockSpec((None, None, None, rows, 1), lambda b, h, s: (b, h, s, 0, 0))
  return pl.pallas_call(
    functools.partial(_gpu_decode_kernel, cfg=cfg),
    grid=(batch, kv_heads, splits),
    in_specs=[*[lengths_spec] * len(scalars), q_spec, kv_spec, kv_spec],
    out_specs=[o_spec, lse_spec],
    out_shape=out_shape,
    compiler_params=compiler_params(cfg.target, 3, cfg.num_warps, cfg.num_stages),
    interpret=cfg.interpret,
    name="decode_attention",
  )(*scalars, q_rows, k_cache, v_cache)


def _tpu_decode_call(cfg: DecodeConfig, scalars, q_rows, k_cache, v_cache, out_shape):
  """The "tpu" pallas_call: scalars are prefetched to SMEM and steer the K/V
  index map, so tiles outside a row's range are not fetched."""
  from jax.experimental.pallas import tpu as pltpu

  batch, kv_heads, rows, head_dim = q_rows.shape
  has_starts = cfg.has_starts

  def kv_index(b, h, s, t, *scalar_refs):
    start = scalar_refs[0][b] if has_starts else None
    tile = _tpu_kv_tile_index(
      start,
      scalar_refs[-1][b],
      s,
      t,
      block_k=cfg.block_k,
      num_splits=cfg.num_splits,
      num_tiles=cfg.num_tiles,
    )
    return b, h, tile, 0

  q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s, t, *_: (b, h, 0, 0))
  kv_spec = pl.BlockSpec((None, None, cfg.block_k, head_dim), kv_index)
  o_spec = pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s, t, *_: (b, h, s, 0, 0))
  lse_spec = pl.BlockSpec((None, None, None, rows, 1), lambda b, h, s, t, *_: (b, h, s, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=len(scalars),
    grid=(batch, kv_heads, cfg.num_splits, cfg.tiles_per_split),
    in_specs=[q_spec, kv_spec, kv_spec],
    out_specs=[o_spec, lse_spec],
    scratch_shapes=[
      pltpu.VMEM((rows, head_dim), jnp.float32),
      pltpu.VMEM((rows, 1), jnp.float32),
      pltpu.VMEM((rows, 1), jnp.float32),
    ],
  )
  return pl.pallas_call(
    functools.partial(_tpu_decode_kernel, cfg=cfg),
    grid_spec=grid_spec,
    out_shape=out_shape,
    # The tile axis carries the scratch accumulators: sequential.
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",)),
    interpret=cfg.interpret,
    name="decode_attention",
  )(*scalars, q_rows, k_cache, v_cache)


def merge_partials(
  out_parts: jax.Array, lse_parts: jax.Array, axis: int
) -> Tuple[jax.Array, jax.Array]:
  """Merges normalised partial attention results over `axis` exactly.

  out_parts [..., d] f32 with lse_parts of the same shape minus the last dim;
  parts with lse -inf (nothing seen) get weight 0; if all are -inf the result
  is zeros with lse -inf.
  """
  lse_max = jnp.max(lse_parts, axis=axis, keepdims=True)
  finite = jnp.isfinite(lse_max)
  safe_max = jnp.where(finite, lse_max, 0.0)
  weights = jnp.exp(lse_parts - safe_max)  # exp(-inf) = 0 for empty parts
  total = jnp.sum(weights, axis=axis, keepdims=True)
  safe_total = jnp.where(total > 0, total, 1.0)
  out = jnp.sum(out_parts * (weights / safe_total)[..., None], axis=axis)
  lse = jnp.where(total > 0, jnp.log(safe_total) + safe_max, -jnp.inf)
  return out, jnp.squeeze(lse, axis)


def _default_splits(batch: int, kv_heads: int, num_tiles: int) -> int:
  """Enough programs to fill a large GPU (~2 waves of 132 SMs)."""
  target_programs = 256
  return max(1, min(num_tiles, -(-target_programs // (batch * kv_heads))))


def decode_attention(
  q: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  ends: jax.Array,
  *,
  starts: Optional[jax.Array] = None,
  sm_scale: Optional[float] = None,
  impl: Optional[str] = None,
  num_splits: Optional[int] = None,
  block_k: Optional[int] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Attention of a few new tokens over a KV cache, with split-KV.

  Args:
    q: `[batch, q_len, heads, head_dim]`, q_len small (1..~8).
    k_cache, v_cache: `[batch, kv_len, kv_heads, head_dim]`; query head h
      reads kv head h // (heads // kv_heads).
    ends: int32 `[batch]`, exclusive end positions: every query token of row
      b sees cache positions [starts[b], ends[b]) (no causality among the
      query tokens); with starts 0, the number of valid positions.
    starts: optional int32 `[batch]`, default zeros: the first cache position
      row b sees (a left-padded cache's pad). Tiles wholly before starts[b]
      are not read.
    sm_scale: default head_dim ** -0.5.
    impl: None (auto: "pallas" on gpu/tpu, "xla" on cpu) | "pallas" |
      "interpret" | "xla".
    num_splits: chunks the cache is split into (default: enough programs to
      fill a large GPU), at most the tile count. On TPU lowered to the fewest
      splits of ceil(tiles / num_splits) tiles each.
    block_k: cache positions per tile (power of two >= 16; default 128 for
      head_dim <= 64, else 64, so 3 pipelined K and V tiles fit in shared
      memory; on TPU 512, since there every tile is one grid step, with a
      fixed cost of its own).

  Returns:
    out `[batch, q_len, heads, head_dim]` (q.dtype) and lse
    `[batch, heads, q_len]` float32, natural log. An empty range
    (starts[b] >= ends[b], e.g. ends[b] == 0) gives zeros and lse -inf.
  """
  lengths = ends  # the kernels' name for the exclusive end
  reference.check_attention_shapes(q, k_cache, v_cache)
  if k_cache.dtype != v_cache.dtype:
    raise ValueError(
      f"k_cache and v_cache must share a dtype; got {k_cache.dtype} and {v_cache.dtype}"
    )
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
  lengths = jnp.asarray(lengths, jnp.int32)
  if lengths.shape != (batch,):
    raise ValueError(f"ends must be int32 [batch={batch}]; got shape {lengths.shape}")
  if starts is not None:
    starts = jnp.asarray(starts, jnp.int32)
    if starts.shape != (batch,):
      raise ValueError(f"starts must be int32 [batch={batch}]; got shape {starts.shape}")
  if sm_scale is None:
    sm_scale = head_dim**-0.5
  if num_splits is not None and int(num_splits) < 1:
    raise ValueError(f"num_splits must be >= 1; got {num_splits}")
  impl = resolve_impl(impl)
  if impl == "xla":
    return reference.reference_decode_attention(
      q, k_cache, v_cache, lengths, starts=starts, sm_scale=sm_scale
    )

  target = resolve_target(impl)
  group = heads // kv_heads
  # Lengths above the cache size would read past it: clamp (the reference
  # also sees at most kv_len keys, so results agree). Likewise starts outside
  # [0, kv_len] select the same positions as their clamped values.
  lengths = jnp.clip(lengths, 0, kv_len)
  if starts is not None:
    starts = jnp.clip(starts, 0, kv_len)
  if target == "tpu":
    default_block = 512  # one grid step per tile: amortise its fixed cost
  else:
    default_block = 128 if head_dim <= 64 else 64
  bk = pick_block(block_k, default_block, kv_len)
  kv_len_p = round_up(kv_len, bk)
  num_tiles = kv_len_p // bk
  splits = (
    _default_splits(batch, kv_heads, num_tiles)
    if num_splits is None
    else min(int(num_splits), num_tiles)
  )
  tiles_per_split = -(-num_tiles // splits)
  if target == "tpu":
    # Fewest splits with this many grid steps each: a split every row would
    # leave empty is no program, not `tiles_per_split` idle grid steps.
    splits = -(-num_tiles // tiles_per_split)
  d_p = padded_head_dim(head_dim, target)
  # Query rows of one kv head, ordered (q token, group member), padded so the
  # tile is a legal matmul operand: a power of two >= 16 for Triton, a
  # multiple of 8 (the f32 sublane count) for Mosaic.
  rows = group * q_len
  rows_p = max(16, pl.next_power_of_2(rows)) if target == "gpu" else round_up(rows, 8)
  cfg = DecodeConfig(
    sm_scale=float(sm_scale),
    block_k=bk,
    num_splits=splits,
    num_tiles=num_tiles,
    tiles_per_split=tiles_per_split,
    rows=rows_p,
    target=target,
    interpret=impl == "interpret",
    num_warps=4,
    num_stages=3 if head_dim <= 128 else 2,  # untuned: see kernel_bench
    has_starts=starts is not None,
  )

  # Matmul operands in the cache dtype (mixed-dtype dots do not lower on
  # Triton); the cache is the big array, so it is never cast.
  q_rows = q.astype(k_cache.dtype).reshape(batch, q_len, kv_heads, group, head_dim)
  q_rows = jnp.transpose(q_rows, (0, 2, 1, 3, 4)).reshape(batch, kv_heads, rows, head_dim)
  q_rows = pad_axis(pad_axis(q_rows, 2, rows_p), 3, d_p)
  # These pads copy the cache only for odd kv_len / head_dim.
  k_p = pad_axis(pad_axis(k_cache, 1, kv_len_p), 3, d_p)
  v_p = pad_axis(pad_axis(v_cache, 1, kv_len_p), 3, d_p)
  if target == "tpu":
    k_p, v_p = jnp.swapaxes(k_p, 1, 2), jnp.swapaxes(v_p, 1, 2)

  out_parts, lse_parts = _decode_call(cfg, starts, lengths, q_rows, k_p, v_p)
  out, lse = merge_partials(out_parts, lse_parts[..., 0], axis=2)
  # out [b, kvh, rows_p, d_p] -> [b, q_len, heads, d]
  out = out[:, :, :rows, :head_dim].reshape(batch, kv_heads, q_len, group, head_dim)
  out = jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(batch, q_len, heads, head_dim)
  lse = lse[:, :, :rows].reshape(batch, kv_heads, q_len, group)
  lse = jnp.transpose(lse, (0, 1, 3, 2)).reshape(batch, heads, q_len)
  return out.astype(q.dtype), lse
