"""decode_attention (split-KV Pallas kernel, interpret mode) vs the reference.

Checks out and lse (exact to f32 rounding: distributed tree decode merges
per-device results with this lse) on ragged lengths including 0 and a full
cache, GQA, several query tokens, split counts, f32 and bf16; and per-row
`starts` (left-padded caches) including empty ranges, with the tiles the
kernel must skip poisoned with NaN so that reading them fails the test; and
that the "tpu" kernel's K/V index map makes the pipeline fetch only the
tiles in [starts, lengths) (the map itself over the whole grid, and the
copies the TPU interpreter makes).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention, reference_attention, reference_decode_attention
from pallas_kernels._common import force_target
from pallas_kernels.decode_attention import _split_tiles, _tpu_kv_tile_index, merge_partials

# kv_len 100 is not a multiple of the 16-wide tiles used here (padded tail).
BATCH, Q_LEN, HEADS, KV_HEADS, KV_LEN, HEAD_DIM = 4, 3, 4, 2, 100, 32
LENGTHS = jnp.array([0, 37, 100, 5], jnp.int32)


def _inputs(dtype, seed=0, batch=BATCH):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, Q_LEN, HEADS, HEAD_DIM), jnp.float32)
  k = jax.random.normal(kk, (batch, KV_LEN, KV_HEADS, HEAD_DIM), jnp.float32)
  v = jax.random.normal(kv, (batch, KV_LEN, KV_HEADS, HEAD_DIM), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _check(out, lse, ref_out, ref_lse, atol):
  assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
  assert lse.shape == (BATCH, HEADS, Q_LEN) and lse.dtype == jnp.float32
  out32 = np.asarray(out, np.float32)
  assert not np.any(np.isnan(out32)) and not np.any(np.isnan(np.asarray(lse)))
  # lengths[b] == 0: zeros and lse == -inf, exactly.
  np.testing.assert_array_equal(np.asarray(lse)[0], -np.inf)
  assert np.all(out32[0] == 0.0)
  assert np.all(np.isfinite(np.asarray(lse)[1:]))
  out_err = np.abs(out32 - np.asarray(ref_out, np.float32))
  lse_err = np.abs(np.asarray(lse)[1:] - np.asarray(ref_lse)[1:])
  print(
    f"  out: max_err={out_err.max():.2e} mean_err={out_err.mean():.2e}; "
    f"lse: max_err={lse_err.max():.2e} mean_err={lse_err.mean():.2e}"
  )
  np.testing.assert_allclose(out32, np.asarray(ref_out, np.float32), atol=atol)
  np.testing.assert_allclose(np.asarray(lse)[1:], np.asarray(ref_lse)[1:], atol=2e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def f32_case():
  q, k, v = _inputs(jnp.float32)
  return (q, k, v), jax.jit(reference_decode_attention)(q, k, v, LENGTHS)


# num_splits=3 with 7 tiles gives uneven chunks; 16 > tiles is clamped.
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_f32_matches_reference(f32_case, num_splits):
  (q, k, v), (ref_out, ref_lse) = f32_case
  run = jax.jit(
    lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, impl="interpret", num_splits=num_splits, block_k=16
    )
  )
  out, lse = run(q, k, v, LENGTHS)
  print(f"\n[decode f32 splits={num_splits}]")
  _check(out, lse, ref_out, ref_lse, atol=2e-6)


def test_decode_bf16_matches_reference():
  q, k, v = _inputs(jnp.bfloat16, seed=1)
  ref_out, ref_lse = reference_decode_attention(q, k, v, LENGTHS)
  out, lse = jax.jit(
    lambda q, k, v, lengths: decode_attention(q, k, v, lengths, impl="interpret", block_k=32)
  )(q, k, v, LENGTHS)
  print("\n[decode bf16 default splits]")
  # bf16 p@v operands in the kernel; the lse is f32 math on bf16 inputs.
  _check(out, lse, ref_out, ref_lse, atol=2e-2)


def test_decode_split_results_merge_like_one_call(f32_case):
  """Two half caches, merged with their lse, equal one call on the whole cache
  (the property distributed tree decode relies on)."""
  (q, k, v), (ref_out, ref_lse) = f32_case
  half = 48
  run = jax.jit(
    lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, impl="interpret", num_splits=2, block_k=16
    )
  )
  first = run(q, k[:, :half], v[:, :half], jnp.minimum(LENGTHS, half))
  second = run(q, k[:, half:], v[:, half:], jnp.clip(LENGTHS - half, 0, KV_LEN - half))
  outs = jnp.stack([first[0], second[0]]).astype(jnp.float32)  # [2, b, t, h, d]
  lses = jnp.stack(
    [jnp.transpose(first[1], (0, 2, 1)), jnp.transpose(second[1], (0, 2, 1))]
  )  # [2, b, t, h]
  out, lse = merge_partials(outs, lses, axis=0)
  print("\n[decode merged halves]")
  _check(out, jnp.transpose(lse, (0, 2, 1)), ref_out, ref_lse, atol=2e-6)


def test_decode_tpu_variant_in_tpu_interpret_mode(f32_case):
  from jax.experimental.pallas import tpu as pltpu

  (q, k, v), (ref_out, ref_lse) = f32_case
  with force_target("tpu"), pltpu.force_tpu_interpret_mode():
    out, lse = decode_attention(q, k, v, LENGTHS, impl="pallas", num_splits=3, block_k=16)
  print("\n[decode tpu interpret]")
  _check(out, lse, ref_out, ref_lse, atol=2e-6)


# Per-row windows [start, length): row 0 is empty with start == length > 0,
# row 5 is empty with start > length, row 3 starts on a tile boundary (16),
# rows 1, 2 and 4 start at random offsets (row 1 and 4 past the first tiles).
_rng = np.random.default_rng(0)
S_LENGTHS = np.array([37, 100, 5, 64, 90, 3], np.int32)
S_STARTS = np.array(
  [37, _rng.integers(17, 99), _rng.integers(1, 5), 16, _rng.integers(33, 89), 9], np.int32
)
S_EMPTY = S_STARTS >= S_LENGTHS


def _poison_skipped(cache, block_k):
  """NaN in every cache position of a tile wholly before starts[b] or past
  lengths[b]: the kernel must not read them. A read shows as NaN in out when
  the tile shares a split with a visible position (always with one split); a
  split that sees nothing else reports out 0, lse -inf whatever it read."""
  pos = np.arange(KV_LEN)[None, :]
  first = (S_STARTS // block_k * block_k)[:, None]
  end = (-(-S_LENGTHS // block_k) * block_k)[:, None]
  skipped = (pos < first) | (pos >= end)  # [batch, kv_len]
  return jnp.where(jnp.asarray(skipped)[:, :, None, None], jnp.asarray(np.nan, cache.dtype), cache)


def _check_windows(out, lse, ref_out, ref_lse, atol):
  """Like _check, for the S_* rows: empty rows give exactly 0 / -inf."""
  assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
  assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
  out32, lse = np.asarray(out, np.float32), np.asarray(lse)
  assert not np.any(np.isnan(out32)) and not np.any(np.isnan(lse))
  assert np.all(out32[S_EMPTY] == 0.0)
  np.testing.assert_array_equal(lse[S_EMPTY], -np.inf)
  assert np.all(np.isfinite(lse[~S_EMPTY]))
  ref32 = np.asarray(ref_out, np.float32)
  out_err = np.abs(out32 - ref32)
  lse_err = np.abs(lse[~S_EMPTY] - np.asarray(ref_lse)[~S_EMPTY])
  print(
    f"  out: max_err={out_err.max():.2e} mean_err={out_err.mean():.2e}; "
    f"lse: max_err={lse_err.max():.2e} mean_err={lse_err.mean():.2e}"
  )
  np.testing.assert_allclose(out32, ref32, atol=atol)
  np.testing.assert_allclose(lse[~S_EMPTY], np.asarray(ref_lse)[~S_EMPTY], atol=2e-6, rtol=1e-6)


def test_reference_with_starts_is_a_window_mask():
  """reference_decode_attention(starts=...) equals reference_attention with
  the explicit [start, length) mask (and changes the result: starts count)."""
  q, k, v = _inputs(jnp.float32, seed=2, batch=len(S_LENGTHS))
  pos = np.arange(KV_LEN)
  window = (pos >= S_STARTS[:, None]) & (pos < S_LENGTHS[:, None])
  mask = jnp.broadcast_to(jnp.asarray(window)[:, None], (len(S_LENGTHS), Q_LEN, KV_LEN))
  want, want_lse = jax.jit(reference_attention)(q, k, v, mask=mask)
  got, got_lse = jax.jit(reference_decode_attention)(q, k, v, S_LENGTHS, starts=S_STARTS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_lse)[S_EMPTY], -np.inf)
  np.testing.assert_allclose(
    np.asarray(got_lse)[~S_EMPTY], np.asarray(want_lse)[~S_EMPTY], rtol=1e-6
  )
  no_starts, _ = jax.jit(reference_decode_attention)(q, k, v, S_LENGTHS)
  assert not np.allclose(np.asarray(no_starts)[1], np.asarray(got)[1])


@pytest.fixture(scope="module")
def starts_case():
  q, k, v = _inputs(jnp.float32, seed=2, batch=len(S_LENGTHS))
  return (q, k, v), jax.jit(reference_decode_attention)(q, k, v, S_LENGTHS, starts=S_STARTS)


# 7 tiles of 16: one split, uneven splits (3), more splits than tiles (16).
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_starts_f32_matches_reference(starts_case, num_splits):
  (q, k, v), (ref_out, ref_lse) = starts_case
  run = jax.jit(
    lambda q, k, v, lengths, starts: decode_attention(
      q, k, v, lengths, starts=starts, impl="interpret", num_splits=num_splits, block_k=16
    )
  )
  out, lse = run(q, _poison_skipped(k, 16), _poison_skipped(v, 16), S_LENGTHS, S_STARTS)
  print(f"\n[decode starts f32 splits={num_splits}]")
  _check_windows(out, lse, ref_out, ref_lse, atol=2e-6)


def test_decode_starts_bf16_matches_reference():
  q, k, v = _inputs(jnp.bfloat16, seed=3, batch=len(S_LENGTHS))
  ref_out, ref_lse = reference_decode_attention(q, k, v, S_LENGTHS, starts=S_STARTS)
  out, lse = jax.jit(
    lambda q, k, v, lengths, starts: decode_attention(
      q, k, v, lengths, starts=starts, impl="interpret", block_k=32
    )
  )(q, _poison_skipped(k, 32), _poison_skipped(v, 32), S_LENGTHS, S_STARTS)
  print("\n[decode starts bf16 default splits]")
  _check_windows(out, lse, ref_out, ref_lse, atol=2e-2)


def test_decode_starts_tpu_variant_in_tpu_interpret_mode(starts_case):
  from jax.experimental.pallas import tpu as pltpu

  (q, k, v), (ref_out, ref_lse) = starts_case
  # block_k 32: 4 tiles, each row's valid ones in 2 runs of 2 grid steps, so
  # a split may hold one valid tile, or none (its steps all clamped).
  with force_target("tpu"), pltpu.force_tpu_interpret_mode():
    out, lse = decode_attention(
      q,
      _poison_skipped(k, 32),
      _poison_skipped(v, 32),
      S_LENGTHS,
      starts=S_STARTS,
      impl="pallas",
      num_splits=2,
      block_k=32,
    )
  print("\n[decode starts tpu interpret]")
  _check_windows(out, lse, ref_out, ref_lse, atol=2e-6)


@pytest.mark.parametrize("with_starts", [False, True])
@pytest.mark.parametrize("target,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_decode_lowers_for_accelerators(target, platform, with_starts):
  q = jax.ShapeDtypeStruct((8, 1, 32, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((8, 4096, 8, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
  starts = lengths if with_starts else None
  with force_target(target):
    lowered = (
      jax.jit(lambda q, k, v, n, s: decode_attention(q, k, v, n, starts=s, impl="pallas"))
      .trace(q, cache, cache, lengths, starts)
      .lower(lowering_platforms=(platform,))
    )
  marker = (
    "custom_call @__gpu$xla.gpu.triton" if target == "gpu" else "custom_call @tpu_custom_call"
  )
  assert lowered.as_text().count(marker) == 1


def test_decode_errors():
  q, k, v = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="ends must be int32"):
    decode_attention(q, k, v, jnp.zeros((BATCH + 1,), jnp.int32))
  with pytest.raises(ValueError, match="num_splits must be >= 1"):
    decode_attention(q, k, v, LENGTHS, num_splits=0)
  bad_starts = jnp.zeros((BATCH, 1), jnp.int32)
  for impl in ("interpret", "xla"):
    with pytest.raises(
      ValueError,
      match=r"starts must be int32 \[batch=4\]; "
      r"got shape \(4, 1\)",
    ):
      decode_attention(q, k, v, LENGTHS, starts=bad_starts, impl=impl)
  with pytest.raises(ValueError, match=r"starts must be int32 \[batch=4\]"):
    reference_decode_attention(q, k, v, LENGTHS, starts=jnp.zeros((3,)))


# The "tpu" kernel's K/V index map (scalar prefetch, 4-D grid): tiles outside
# a row's [start, length) are never fetched.


def _valid_tiles(start, length, block_k):
  """Tiles holding a position in [start, length) (start None: 0)."""
  first = 0 if start is None else start // block_k
  return list(range(first, -(-length // block_k)))


def _simulate_tpu_grid(starts, lengths, *, block_k, num_tiles, num_splits, kv_heads=2):
  """Walks the "tpu" grid in order and returns, per row, the K/V tiles the
  pipeline fetches (a block is fetched when its index differs from the
  previous step's) and the tiles the kernel computes (in grid order)."""
  tiles_per_split = -(-num_tiles // num_splits)
  num_splits = -(-num_tiles // tiles_per_split)  # as decode_attention does
  grid = np.stack(
    np.meshgrid(
      np.arange(len(lengths)),
      np.arange(kv_heads),
      np.arange(num_splits),
      np.arange(tiles_per_split),
      indexing="ij",
    ),
    -1,
  ).reshape(-1, 4)
  b, h, s, t = (jnp.asarray(grid[:, i], jnp.int32) for i in range(4))
  length = jnp.asarray(lengths, jnp.int32)[b]
  start = None if starts is None else jnp.asarray(starts, jnp.int32)[b]
  kw = dict(block_k=block_k, num_splits=num_splits)
  tile = np.asarray(
    jax.vmap(functools.partial(_tpu_kv_tile_index, num_tiles=num_tiles, **kw))(start, length, s, t)
  )
  _, _, lo, hi = jax.vmap(functools.partial(_split_tiles, **kw))(start, length, s)
  computed = np.asarray(lo + t < hi)
  # The kernel computes tile lo + t and must find exactly that one in VMEM.
  np.testing.assert_array_equal(tile[computed], np.asarray(lo + t)[computed])
  assert np.all((tile >= 0) & (tile < num_tiles))
  fetched, used = [], []
  previous = None
  for row in range(len(lengths)):
    fetched.append([])
    used.append([])
    for step in np.flatnonzero(grid[:, 0] == row):
      block = (row, grid[step, 1], tile[step])
      if block != previous:
        fetched[row].append((grid[step, 1], tile[step]))
      if computed[step]:
        used[row].append((grid[step, 1], tile[step]))
      previous = block
  return fetched, used


# block_k 16, kv_len 200 (13 tiles, the last partial) and 208 (exactly 13:
# start == kv_len puts the first tile at 13, past the last).
@pytest.mark.parametrize("num_splits", [1, 3, 5, 13])
@pytest.mark.parametrize("with_starts", [True, False])
def test_tpu_kv_index_map_fetches_only_valid_tiles(num_splits, with_starts):
  block_k, num_tiles, kv_heads = 16, 13, 2
  starts = np.array([70, 0, 150, 0, 192, 200, 208, 31, 16], np.int32)
  lengths = np.array([170, 200, 100, 0, 197, 200, 208, 33, 208], np.int32)
  if not with_starts:
    starts = None
  fetched, used = _simulate_tpu_grid(
    starts, lengths, block_k=block_k, num_tiles=num_tiles, num_splits=num_splits, kv_heads=kv_heads
  )
  total = 0
  for row, length in enumerate(lengths):
    start = None if starts is None else int(starts[row])
    valid = _valid_tiles(start, int(length), block_k)
    want = [(h, tile) for h in range(kv_heads) for tile in valid]
    # Every valid tile is computed exactly once per kv head, in order.
    assert used[row] == want, (row, used[row])
    if valid:
      # One fetch per valid tile: the skipped ones cost no HBM traffic.
      assert fetched[row] == want, (row, fetched[row])
    else:
      # An empty row maps to one (in-bounds) tile per kv head.
      assert [h for h, _ in fetched[row]] == list(range(kv_heads))
    total += len(fetched[row])
  # The old static-chunk kernel fetched every tile of every (row, kv head).
  print(
    f"\n[tpu index map splits={num_splits} starts={with_starts}] "
    f"{total} tile fetches, {len(lengths) * kv_heads * num_tiles} before"
  )


def test_tpu_variant_pipeline_fetches_only_valid_tiles(monkeypatch):
  """The same, observed in the TPU interpreter: it copies an input block from
  HBM only when the block index changes, like the Mosaic pipeline. Parallel
  grid axes run in a random order there, so a split may re-fetch the tile
  its predecessor held: this checks which tiles are read, not how often."""
  from jax.experimental.pallas import tpu as pltpu

  ipc = pytest.importorskip("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
  if not hasattr(ipc, "get"):
    pytest.skip("TPU interpreter internals changed (no get)")
  original_get = ipc.get
  reads = collections.defaultdict(list)

  def recording_get(*args, input_name=None, **kwargs):
    if input_name is not None:  # a block copied in for a grid step
      reads[input_name].append(tuple(int(i) for i in args[6]))
    return original_get(*args, input_name=input_name, **kwargs)

  monkeypatch.setattr(ipc, "get", recording_get)
  block_k, kv_len, kv_heads = 16, 160, 2  # 10 tiles; shapes used only here
  starts = np.array([70, 0, 150, 0, 33], np.int32)
  lengths = np.array([150, 160, 100, 0, 47], np.int32)
  rng = np.random.default_rng(7)
  q = rng.standard_normal((5, 1, 4, 16), np.float32)
  k = rng.standard_normal((5, kv_len, kv_heads, 16), np.float32)
  v = rng.standard_normal((5, kv_len, kv_heads, 16), np.float32)
  with force_target("tpu"), pltpu.force_tpu_interpret_mode():
    out, lse = decode_attention(
      q, k, v, lengths, starts=starts, impl="pallas", num_splits=3, block_k=block_k
    )
    jax.block_until_ready((out, lse))
  if len(reads) != 3:
    pytest.skip(f"TPU interpreter internals changed (inputs {list(reads)})")
  _, k_reads, v_reads = (reads[name] for name in sorted(reads))  # q, k, v
  assert k_reads == v_reads
  num_valid = 0
  for row, (start, length) in enumerate(zip(starts, lengths)):
    valid = _valid_tiles(int(start), int(length), block_k)
    num_valid += len(valid) * kv_heads
    for h in range(kv_heads):
      tiles = {tile for b, hh, tile, _ in k_reads if (b, hh) == (row, h)}
      if valid:
        assert tiles == set(valid), (row, h, sorted(tiles))
      else:
        assert len(tiles) == 1, (row, h, sorted(tiles))
  print(
    f"\n[tpu interpret pipeline] {len(k_reads)} K tile fetches "
    f"({num_valid} valid tiles, "
    f"{len(lengths) * kv_heads * kv_len // block_k} in the cache)"
  )
  ref_out, ref_lse = jax.jit(reference_decode_attention)(q, k, v, lengths, starts=starts)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-6, rtol=1e-6)


# Odd sizes: kv_len 200 (7 tiles of 32, the last partial), head_dim 40,
# GQA group 3 with 2 query tokens (6 rows, padded to 8). Rows: mid-tile
# start and end, full, start > length, length 0, one valid tile (fewer than
# the splits), start == length == kv_len (empty, inside the last tile).
W_STARTS = np.array([70, 0, 150, 0, 192, 200], np.int32)
W_LENGTHS = np.array([170, 200, 100, 0, 197, 200], np.int32)


def test_decode_tpu_variant_odd_sizes_gqa():
  from jax.experimental.pallas import tpu as pltpu

  batch, kv_len, block_k = len(W_LENGTHS), 200, 32
  rng = np.random.default_rng(11)
  q, k, v = (
    rng.standard_normal(shape, np.float32)
    for shape in [(batch, 2, 6, 40)] + [(batch, kv_len, 2, 40)] * 2
  )
  empty = W_STARTS >= W_LENGTHS
  pos = np.arange(kv_len)[None, :]
  skipped = (pos < (W_STARTS // block_k * block_k)[:, None]) | (
    pos >= (-(-W_LENGTHS // block_k) * block_k)[:, None]
  )
  poison = lambda x: np.where(skipped[:, :, None, None], np.nan, x)
  ref_out, ref_lse = jax.jit(reference_decode_attention)(q, k, v, W_LENGTHS, starts=W_STARTS)
  with force_target("tpu"), pltpu.force_tpu_interpret_mode():
    out, lse = decode_attention(
      q,
      poison(k),
      poison(v),
      W_LENGTHS,
      starts=W_STARTS,
      impl="pallas",
      num_splits=5,
      block_k=block_k,
    )
  assert out.dtype == jnp.float32 and lse.shape == (batch, 6, 2)
  out, lse = np.asarray(out), np.asarray(lse)
  assert not np.any(np.isnan(out)) and not np.any(np.isnan(lse))
  assert np.all(out[empty] == 0.0)
  np.testing.assert_array_equal(lse[empty], -np.inf)
  assert np.all(np.isfinite(lse[~empty]))
  np.testing.assert_allclose(out, np.asarray(ref_out), atol=2e-6)
  np.testing.assert_allclose(lse[~empty], np.asarray(ref_lse)[~empty], atol=2e-6, rtol=1e-6)
