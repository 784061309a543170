"""Multi-device checks of the sharded decode attentions, on 8 forced CPU devices.

Run in its own process by test_multidevice.py (never import it from pytest):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/distributed/multidevice_checks.py
Prints one JSON line per check ({"name", "ok", "detail"}) and exits 1 if any
failed. Every sharded result is compared with the plain-jnp single-device
oracle `full_decode_attention_reference`.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bt_jax.distributed import (
  full_decode_attention_reference,
  make_sequence_mesh,
  make_sharded_decode_attention,
  make_two_level_mesh,
  tree_decode_attention,
)
from bt_jax.distributed.study import collective_traffic, make_method_attention
from tests.multidevice import check, record, summary

BATCH, HEADS, KV_HEADS, HEAD_DIM, KV_LEN = 5, 4, 2, 16, 64
# Row lengths on 8 shards of 8 keys: full, ragged inside shard 1 (shards 2-7
# empty), exactly one shard, ragged in the last shard, no key at all.
LENGTHS = np.array([64, 13, 8, 61, 0], np.int32)


def make_inputs(q_len, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (BATCH, q_len, HEADS, HEAD_DIM), dtype)
  k = jax.random.normal(keys[1], (BATCH, KV_LEN, KV_HEADS, HEAD_DIM), dtype)
  v = jax.random.normal(keys[2], (BATCH, KV_LEN, KV_HEADS, HEAD_DIM), dtype)
  return q, k, v, jnp.asarray(LENGTHS)


def compare(name, got, want, atol):
  """got/want: (out, lse). -inf lse and zero output required on empty rows."""
  out, lse = (np.asarray(x, np.float32) for x in got)
  want_out, want_lse = (np.asarray(x, np.float32) for x in want)
  problems = []
  if out.shape != want_out.shape or lse.shape != want_lse.shape:
    problems.append(f"shapes {out.shape}/{lse.shape} vs {want_out.shape}/{want_lse.shape}")
  else:
    if np.isnan(out).any() or np.isnan(lse).any():
      problems.append("NaN in result")
    if not np.array_equal(np.isneginf(lse), np.isneginf(want_lse)):
      problems.append("-inf pattern of lse differs")
    finite = np.isfinite(want_lse)
    out_err = float(np.max(np.abs(out - want_out)))
    lse_err = float(np.max(np.abs(lse[finite] - want_lse[finite])))
    if out_err > atol or lse_err > atol:
      problems.append(f"max err out {out_err:.2e} lse {lse_err:.2e} > {atol}")
    empty = LENGTHS == 0
    if np.any(out[empty] != 0):
      problems.append("empty rows have nonzero output")
  record(name, not problems, "; ".join(problems) or "ok")


def sharded_methods_agree():
  mesh8 = make_sequence_mesh(8)
  mesh2x4 = make_two_level_mesh(2, 4)
  for q_len in (1, 3):
    q, k, v, lengths = make_inputs(q_len)
    want = full_decode_attention_reference(q, k, v, lengths)
    for method in ("tree", "tree_butterfly", "ring_kv", "ring_partials"):
      check(
        f"seq8/{method}/q_len{q_len}",
        lambda: compare(
          f"seq8/{method}/q_len{q_len}",
          make_method_attention(mesh8, method=method)(q, k, v, lengths),
          want,
          1e-5,
        ),
      )
  q, k, v, lengths = make_inputs(2, seed=1)
  want = full_decode_attention_reference(q, k, v, lengths)
  for method in ("tree_two_level", "tree", "tree_butterfly", "ring_kv", "ring_partials"):
    check(
      f"mesh2x4/{method}/q_len2",
      lambda: compare(
        f"mesh2x4/{method}/q_len2",
        make_method_attention(mesh2x4, method=method)(q, k, v, lengths),
        want,
        1e-5,
      ),
    )


def bf16_tree():
  q, k, v, lengths = make_inputs(1, jnp.bfloat16, seed=2)
  want = full_decode_attention_reference(q, k, v, lengths)
  got = make_sharded_decode_attention(make_sequence_mesh(8))(q, k, v, lengths)
  assert got[0].dtype == jnp.bfloat16, got[0].dtype
  compare("seq8/tree/bf16", got, want, 3e-2)


def tree_with_vma_checks():
  q, k, v, lengths = make_inputs(1, seed=3)
  want = full_decode_attention_reference(q, k, v, lengths)
  fn = make_sharded_decode_attention(make_sequence_mesh(8), check_vma=True)
  compare("seq8/tree/check_vma", fn(q, k, v, lengths), want, 1e-5)


def tree_with_pallas_interpret():
  """The Pallas kernel (interpret mode) inside shard_map, once it exists."""
  q, k, v, lengths = make_inputs(2, seed=5)
  fn = make_sharded_decode_attention(make_sequence_mesh(8), impl="pallas_interpret")
  try:
    got = fn(q, k, v, lengths)
  except NotImplementedError as e:
    record("seq8/tree/interpret", True, f"skipped: {e}")
    return
  compare("seq8/tree/interpret", got, full_decode_attention_reference(q, k, v, lengths), 1e-5)


def per_shard_lengths_api():
  """tree_decode_attention in a user's own shard_map, lengths given per shard."""
  mesh = make_sequence_mesh(8)
  q, k, v, lengths = make_inputs(1, seed=4)
  shard_len = KV_LEN // 8
  per_shard = np.clip(LENGTHS[None, :] - shard_len * np.arange(8)[:, None], 0, shard_len).astype(
    np.int32
  )  # [devices, batch]

  def body(q, k_shard, v_shard, lengths_shard):
    return tree_decode_attention(q, k_shard, v_shard, lengths_shard[0])

  # The default check_vma: no Pallas kernel runs here (impl None on CPU).
  fn = jax.jit(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(P(), P(None, "sequence"), P(None, "sequence"), P("sequence")),
      out_specs=(P(), P()),
    )
  )
  compare(
    "seq8/tree/user_shard_map",
    fn(q, k, v, jnp.asarray(per_shard)),
    full_decode_attention_reference(q, k, v, lengths),
    1e-5,
  )


def hlo_traffic_matches_formulas():
  mesh = make_sequence_mesh(8)
  q_len = 1
  q, k, v, lengths = make_inputs(q_len)
  shard_len = KV_LEN // 8
  partial_elems = BATCH * HEADS * q_len * HEAD_DIM
  stats_elems = BATCH * HEADS * q_len
  # (bytes, fewest and most collective ops): XLA may or may not fuse the
  # arrays of one step (psum of (n, d); ppermute of (k, v, lengths)) into one op.
  want = {
    # pmax(lse) + psum(n, d)
    "tree": (4 * (partial_elems + 2 * stats_elems), 2, 3),
    # 7 steps of (k, v, lengths)
    "ring_kv": (7 * 4 * (2 * BATCH * shard_len * KV_HEADS * HEAD_DIM + BATCH), 7, 7 * 3),
    # 7 steps of (o, lse)
    "ring_partials": (7 * 4 * (partial_elems + stats_elems), 7, 7 * 2),
    # log2(8) = 3 steps of (o, lse)
    "tree_butterfly": (3 * 4 * (partial_elems + stats_elems), 3, 3 * 2),
  }
  for method, (want_bytes, min_ops, max_ops) in want.items():
    fn = make_method_attention(mesh, method=method)
    traffic = collective_traffic(fn.jitted.lower(q, k, v, lengths).compile().as_text())
    ok = traffic["bytes"] == want_bytes and min_ops <= traffic["count"] <= max_ops
    record(
      f"hlo_traffic/{method}",
      ok,
      f"parsed {traffic} want {want_bytes} bytes, {min_ops}-{max_ops} ops",
    )


def main():
  assert jax.device_count() == 8, f"need 8 devices, have {jax.device_count()}"
  sharded_methods_agree()
  check("seq8/tree/bf16", bf16_tree)
  check("seq8/tree/check_vma", tree_with_vma_checks)
  check("seq8/tree/user_shard_map", per_shard_lengths_api)
  check("seq8/tree/interpret", tree_with_pallas_interpret)
  check("hlo_traffic", hlo_traffic_matches_formulas)
  return summary()


if __name__ == "__main__":
  sys.exit(main())
