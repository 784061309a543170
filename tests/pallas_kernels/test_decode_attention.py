"""decode_attention (split-KV Pallas kernel, interpret mode) vs the reference.

Checks out and lse (exact to f32 rounding: distributed tree decode merges
per-device results with this lse) on ragged lengths including 0 and a full
cache, GQA, several query tokens, split counts, f32 and bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention, reference_decode_attention
from pallas_kernels._common import force_target
from pallas_kernels.decode_attention import merge_partials

# kv_len 100 is not a multiple of the 16-wide tiles used here (padded tail).
BATCH, Q_LEN, HEADS, KV_HEADS, KV_LEN, HEAD_DIM = 4, 3, 4, 2, 100, 32
LENGTHS = jnp.array([0, 37, 100, 5], jnp.int32)


def _inputs(dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (BATCH, Q_LEN, HEADS, HEAD_DIM), jnp.float32)
  k = jax.random.normal(kk, (BATCH, KV_LEN, KV_HEADS, HEAD_DIM), jnp.float32)
  v = jax.random.normal(kv, (BATCH, KV_LEN, KV_HEADS, HEAD_DIM), jnp.float32)
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
  print(f"  out: max_err={out_err.max():.2e} mean_err={out_err.mean():.2e}; "
        f"lse: max_err={lse_err.max():.2e} mean_err={lse_err.mean():.2e}")
  np.testing.assert_allclose(out32, np.asarray(ref_out, np.float32), atol=atol)
  np.testing.assert_allclose(np.asarray(lse)[1:], np.asarray(ref_lse)[1:],
                             atol=2e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def f32_case():
  q, k, v = _inputs(jnp.float32)
  return (q, k, v), jax.jit(reference_decode_attention)(q, k, v, LENGTHS)


# num_splits=3 with 7 tiles gives uneven chunks; 16 > tiles is clamped.
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_f32_matches_reference(f32_case, num_splits):
  (q, k, v), (ref_out, ref_lse) = f32_case
  run = jax.jit(lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, impl="interpret", num_splits=num_splits, block_k=16))
  out, lse = run(q, k, v, LENGTHS)
  print(f"\n[decode f32 splits={num_splits}]")
  _check(out, lse, ref_out, ref_lse, atol=2e-6)


def test_decode_bf16_matches_reference():
  q, k, v = _inputs(jnp.bfloat16, seed=1)
  ref_out, ref_lse = reference_decode_attention(q, k, v, LENGTHS)
  out, lse = jax.jit(lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, impl="interpret", block_k=32))(q, k, v, LENGTHS)
  print("\n[decode bf16 default splits]")
  # bf16 p@v operands in the kernel; the lse is f32 math on bf16 inputs.
  _check(out, lse, ref_out, ref_lse, atol=2e-2)


def test_decode_split_results_merge_like_one_call(f32_case):
  """Two half caches, merged with their lse, equal one call on the whole cache
  (the property distributed tree decode relies on)."""
  (q, k, v), (ref_out, ref_lse) = f32_case
  half = 48
  run = jax.jit(lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, impl="interpret", num_splits=2, block_k=16))
  first = run(q, k[:, :half], v[:, :half], jnp.minimum(LENGTHS, half))
  second = run(q, k[:, half:], v[:, half:],
               jnp.clip(LENGTHS - half, 0, KV_LEN - half))
  outs = jnp.stack([first[0], second[0]]).astype(jnp.float32)  # [2, b, t, h, d]
  lses = jnp.stack([jnp.transpose(first[1], (0, 2, 1)),
                    jnp.transpose(second[1], (0, 2, 1))])       # [2, b, t, h]
  out, lse = merge_partials(outs, lses, axis=0)
  print("\n[decode merged halves]")
  _check(out, jnp.transpose(lse, (0, 2, 1)), ref_out, ref_lse, atol=2e-6)


def test_decode_tpu_variant_in_tpu_interpret_mode(f32_case):
  from jax.experimental.pallas import tpu as pltpu
  (q, k, v), (ref_out, ref_lse) = f32_case
  with force_target("tpu"), pltpu.force_tpu_interpret_mode():
    out, lse = decode_attention(q, k, v, LENGTHS, impl="pallas",
                                num_splits=3, block_k=16)
  print("\n[decode tpu interpret]")
  _check(out, lse, ref_out, ref_lse, atol=2e-6)


@pytest.mark.parametrize("target,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_decode_lowers_for_accelerators(target, platform):
  q = jax.ShapeDtypeStruct((8, 1, 32, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((8, 4096, 8, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
  with force_target(target):
    lowered = jax.jit(lambda q, k, v, n: decode_attention(
        q, k, v, n, impl="pallas")).trace(q, cache, cache, lengths).lower(
            lowering_platforms=(platform,))
  marker = ("custom_call @__gpu$xla.gpu.triton" if target == "gpu"
            else "custom_call @tpu_custom_call")
  assert lowered.as_text().count(marker) == 1


def test_decode_errors():
  q, k, v = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="lengths must be int32"):
    decode_attention(q, k, v, jnp.zeros((BATCH + 1,), jnp.int32))
  with pytest.raises(ValueError, match="num_splits must be >= 1"):
    decode_attention(q, k, v, LENGTHS, num_splits=0)
