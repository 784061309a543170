"""flash_attention (Pallas, interpret mode) against the pure-jnp reference.

Every case checks out, lse and the gradients dq/dk/dv (with a cotangent on
lse too) and prints max/mean absolute errors (`pytest -s` shows them). Shapes
are tiny and tiles 16 wide so odd lengths span several tiles plus a padded
tail; interpret mode is slow, so each case compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, reference_attention
from pallas_kernels._common import force_target

BLOCK = 16


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _loss_and_grads(attention, q, k, v):
  """A loss touching out and lse, so the lse cotangent path is exercised."""

  def loss(q, k, v):
    out, lse = attention(q, k, v)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0)
    value = jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32))) + 0.5 * jnp.sum(
      lse_term
    )
    return value, (out, lse)

  # One jit: forward outputs and gradients from a single (slow) compile.
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
    q, k, v
  )
  return out, lse, grads


def _report(name, got, want):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  err = np.abs(got - want)
  print(f"  {name}: max_err={err.max():.2e} mean_err={err.mean():.2e}")
  return err.max()


def _check(kernel, ref, atol, rtol=0.0):
  (out, lse, grads), (ref_out, ref_lse, ref_grads) = kernel, ref
  assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
  assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
  assert not np.any(np.isnan(np.asarray(out, np.float32)))
  # Fully masked rows: lse exactly -inf and output exactly zero in both.
  empty = ~np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(~np.isfinite(np.asarray(lse)), empty)
  np.testing.assert_array_equal(np.asarray(lse)[empty], -np.inf)
  out_rows_empty = np.transpose(empty, (0, 2, 1))  # [b, q, h]
  assert np.all(np.asarray(out, np.float32)[out_rows_empty] == 0.0)
  _report("out", out, ref_out)
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol, rtol=rtol
  )
  _report("lse", np.where(empty, 0, lse), np.where(empty, 0, ref_lse))
  np.testing.assert_allclose(
    np.where(empty, 0, lse), np.where(empty, 0, ref_lse), atol=atol, rtol=rtol
  )
  for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.dtype == rg.dtype
    assert not np.any(np.isnan(np.asarray(g, np.float32)))
    _report(name, g, rg)
    scale = max(1.0, float(np.abs(np.asarray(rg, np.float32)).max()))
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(rg, np.float32), atol=atol * scale, rtol=rtol
    )


def _segments(batch, length, seed):
  """Segment ids with runs of different lengths and a padded (0) tail."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for b in range(batch):
    pos, seg = 0, 1
    end = length - int(rng.integers(0, 6))
    while pos < end:
      run = int(rng.integers(3, 15))
      ids[b, pos : min(pos + run, end)] = seg
      pos += run
      seg += 1
  return jnp.asarray(ids)


# (name, q_len, kv_len, heads, kv_heads, kwargs-builder)
CASES = {
  "plain_gqa": (37, 37, 4, 2, lambda b, tq, tk: {}),
  "causal_cross_shorter_q": (20, 37, 4, 1, lambda b, tq, tk: dict(causal=True)),
  # q_len > kv_len: the first rows see no key at all (zeros, lse -inf).
  "causal_longer_q_empty_rows": (37, 20, 2, 2, lambda b, tq, tk: dict(causal=True)),
  "local_causal": (37, 37, 4, 2, lambda b, tq, tk: dict(local_block=12, causal=True)),
  "local_bidirectional_segments": (
    37,
    37,
    2,
    1,
    lambda b, tq, tk: dict(local_block=16, segment_ids=_segments(b, tq, 1)),
  ),
  "segments_causal_padding": (
    37,
    37,
    4,
    2,
    lambda b, tq, tk: dict(causal=True, segment_ids=_segments(b, tq, 2)),
  ),
  "mask_and_segment_pair": (
    23,
    37,
    2,
    2,
    lambda b, tq, tk: dict(
      mask=jnp.asarray(np.random.default_rng(3).random((b, tq, tk)) < 0.6)
      .at[:, 5, :]
      .set(False),  # an explicitly empty row
      segment_ids=(jnp.ones((b, tq), jnp.int32), jnp.ones((b, tk), jnp.int32).at[:, -4:].set(0)),
    ),
  ),
}


# Unequal forward / dk-dv tiles (as the GPU defaults have) for some cases.
TILES = {
  "causal_cross_shorter_q": dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32),
  "local_causal": dict(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_f32_matches_reference(case):
  q_len, kv_len, heads, kv_heads, build = CASES[case]
  batch = 2
  q, k, v = _inputs(0, batch, q_len, kv_len, heads, kv_heads, 32, jnp.float32)
  kwargs = build(batch, q_len, kv_len)
  tiles = TILES.get(case, dict(block_q=BLOCK, block_k=BLOCK))
  kernel = functools.partial(flash_attention, impl="interpret", return_lse=True, **tiles, **kwargs)
  ref = functools.partial(reference_attention, **kwargs)
  print(f"\n[{case}] f32 {tiles}")
  _check(_loss_and_grads(kernel, q, k, v), _loss_and_grads(ref, q, k, v), atol=2e-5)


def test_flash_bf16_causal_segments_gqa():
  batch, length = 2, 45
  q, k, v = _inputs(1, batch, length, length, 4, 2, 64, jnp.bfloat16)
  kwargs = dict(causal=True, segment_ids=_segments(batch, length, 4))
  kernel = functools.partial(
    flash_attention, impl="interpret", return_lse=True, block_q=BLOCK, block_k=32, **kwargs
  )
  ref = functools.partial(reference_attention, **kwargs)
  print("\n[bf16 causal segments gqa]")
  # The kernel feeds bf16 probabilities to the p@v matmul (as flash attention
  # does); the reference keeps f32 until the final cast.
  _check(_loss_and_grads(kernel, q, k, v), _loss_and_grads(ref, q, k, v), atol=3e-2, rtol=3e-2)


def test_flash_default_blocks_and_scale():
  """Default tiles (one tile, padded) and a custom sm_scale, forward only."""
  q, k, v = _inputs(2, 1, 50, 50, 2, 2, 24, jnp.float32)
  out = jax.jit(
    lambda q, k, v: flash_attention(q, k, v, causal=True, sm_scale=0.3, impl="interpret")
  )(q, k, v)
  ref_out, _ = reference_attention(q, k, v, causal=True, sm_scale=0.3)
  assert _report("out", out, ref_out) < 2e-5


def test_auto_impl_on_cpu_is_reference():
  q, k, v = _inputs(3, 1, 9, 9, 2, 1, 8, jnp.float32)
  out, lse = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, return_lse=True))(
    q, k, v
  )
  ref_out, ref_lse = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=True))(q, k, v)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-6)


def test_tpu_variant_in_tpu_interpret_mode():
  """The Mosaic-layout variant ([b, h, t, d], SMEM-free) run by the TPU
  interpreter, forward and backward."""
  from jax.experimental.pallas import tpu as pltpu

  q, k, v = _inputs(4, 1, 40, 40, 2, 1, 32, jnp.float32)
  kwargs = dict(causal=True, segment_ids=_segments(1, 40, 5))
  kernel = functools.partial(
    flash_attention, impl="pallas", return_lse=True, block_q=BLOCK, block_k=BLOCK, **kwargs
  )
  ref = functools.partial(reference_attention, **kwargs)
  print("\n[tpu interpret]")
  with force_target("tpu"), pltpu.force_tpu_interpret_mode():
    got = _loss_and_grads(kernel, q, k, v)
  _check(got, _loss_and_grads(ref, q, k, v), atol=2e-5)


@pytest.mark.parametrize("target,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_accelerators(target, platform):
  """Forward and backward lower through Triton (cuda) / Mosaic (tpu) on CPU.

  This runs the real Pallas->Triton-IR / Pallas->Mosaic lowering (block-shape,
  dtype and op-support checks); only the final device compile is not run.
  """
  batch, length, heads, kv_heads, head_dim = 2, 300, 4, 2, 64
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, length, length), jnp.bool_)

  def fwd_bwd(q, k, v, seg, mask):
    def loss(q, k, v):
      outs = [
        flash_attention(q, k, v, causal=True, impl="pallas"),
        flash_attention(q, k, v, local_block=64, impl="pallas"),
        flash_attention(q, k, v, causal=True, segment_ids=seg, mask=mask, impl="pallas"),
      ]
      return sum(o.astype(jnp.float32).sum() for o in outs)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with force_target(target):
    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, seg, mask).lower(lowering_platforms=(platform,))
  text = lowered.as_text()
  marker = (
    "custom_call @__gpu$xla.gpu.triton" if target == "gpu" else "custom_call @tpu_custom_call"
  )
  # 3 attentions x (forward + dq + dk/dv) kernels.
  assert text.count(marker) == 9, text[:2000]


def test_errors_name_the_bad_value():
  q, k, v = _inputs(5, 1, 8, 6, 2, 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="impl"):
    flash_attention(q, k, v, impl="cuda")
  with pytest.raises(ValueError, match="local_block needs q_len == kv_len"):
    flash_attention(q, k, v, local_block=4)
  with pytest.raises(ValueError, match="mask must be"):
    flash_attention(q, k, v, mask=jnp.ones((1, 8, 8), bool))
  with pytest.raises(ValueError, match="kv_heads=3 must divide heads=2"):
    flash_attention(q, jnp.zeros((1, 6, 3, 8)), jnp.zeros((1, 6, 3, 8)))
  with pytest.raises(ValueError, match="powers of two"):
    flash_attention(q, k, v, impl="interpret", block_q=24)
