"""Single-process tests: oracle, merge algebra, energy view, HLO parsing.

Multi-device agreement runs in its own process: see test_multidevice.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from bt_jax.distributed import (
  full_decode_attention_reference,
  make_sequence_mesh,
  make_sharded_decode_attention,
  merge_many,
  merge_pair,
  shard_lengths,
  tree_decode_attention,
)
from bt_jax.distributed.study import (
  METHODS,
  attention_energy,
  attention_from_energy,
  collective_traffic,
  formula_traffic,
  make_method_attention,
  sharded_energy,
)


def _inputs(batch=3, q_len=2, heads=4, kv_heads=2, head_dim=8, kv_len=24, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim))
  return q, k, v


def _numpy_attention(q, k, v, lengths):
  """Loop-by-loop float64 attention: the oracle's own oracle."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros(q.shape)
  lse = np.full((batch, heads, q_len), -np.inf)
  for b in range(batch):
    n = int(lengths[b])
    for h in range(heads):
      for t in range(q_len):
        if n == 0:
          continue
        scores = k[b, :n, h // group] @ q[b, t, h] / math.sqrt(head_dim)
        lse[b, h, t] = np.log(np.sum(np.exp(scores - scores.max()))) + scores.max()
        out[b, t, h] = np.exp(scores - lse[b, h, t]) @ v[b, :n, h // group]
  return out, lse


def test_reference_matches_float64_loops_including_empty_rows():
  q, k, v = _inputs()
  lengths = np.array([24, 5, 0])
  out, lse = full_decode_attention_reference(q, k, v, jnp.asarray(lengths))
  want_out, want_lse = _numpy_attention(q, k, v, lengths)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)
  assert np.all(np.asarray(out)[2] == 0) and np.all(np.isneginf(lse[2]))


def test_merging_chunk_partials_equals_full_attention():
  q, k, v = _inputs(kv_len=24)
  lengths = jnp.array([24, 9, 0])  # row 1: chunk 2 empty; row 2: all empty
  want = full_decode_attention_reference(q, k, v, lengths)
  partials = []
  for i in range(3):  # three chunks of 8 keys
    chunk = slice(8 * i, 8 * (i + 1))
    o, lse = full_decode_attention_reference(
      q, k[:, chunk], v[:, chunk], shard_lengths(lengths, i, 8)
    )
    # An empty partial's output must not leak, even if it is garbage.
    o = jnp.where(jnp.isneginf(lse).transpose(0, 2, 1)[..., None], jnp.nan, o)
    partials.append((o, lse))
  for got in (
    merge_many(partials),
    merge_pair(*merge_pair(*partials[0], *partials[1]), *partials[2]),
    merge_pair(*partials[2], *merge_pair(*partials[1], *partials[0])),
  ):
    assert not np.isnan(np.asarray(got[0])).any()
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
    finite = np.isfinite(want[1])
    np.testing.assert_allclose(np.asarray(got[1])[finite], np.asarray(want[1])[finite], atol=1e-5)


def test_shard_lengths_splits_ragged_rows():
  lengths = jnp.array([24, 9, 0, 8])
  per_shard = np.stack([shard_lengths(lengths, i, 8) for i in range(3)])
  np.testing.assert_array_equal(per_shard, [[8, 8, 0, 8], [8, 1, 0, 0], [8, 0, 0, 0]])


def test_energy_value_is_lse_and_gradient_is_attention():
  q, k, v = _inputs(batch=2, q_len=2)
  lengths = jnp.array([24, 7])
  out, lse = jax.jit(attention_from_energy)(q, k, v, lengths)
  want_out, want_lse = full_decode_attention_reference(q, k, v, lengths)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_energy_of_one_head_directly():
  q, k, v = _inputs(batch=1, q_len=1, heads=1, kv_heads=1)
  z = jnp.zeros(v.shape[-1])
  value, grad = jax.value_and_grad(attention_energy, argnums=3)(
    q[0, 0, 0], k[0, :, 0], v[0, :, 0], z
  )
  want_out, want_lse = full_decode_attention_reference(q, k, v, jnp.array([24]))
  np.testing.assert_allclose(value, want_lse[0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(grad, want_out[0, 0, 0], atol=1e-5)


def test_energy_is_logsumexp_of_shard_energies():
  q, k, v = _inputs(batch=1, q_len=1, heads=1, kv_heads=1)
  args = (q[0, 0, 0], k[0, :, 0], v[0, :, 0])
  z = 0.1 * jnp.arange(v.shape[-1], dtype=jnp.float32)  # also away from 0
  full_value, full_grad = jax.value_and_grad(attention_energy, argnums=3)(*args, z)
  tree_value, tree_grad = jax.value_and_grad(sharded_energy, argnums=3)(*args, z, 4)
  np.testing.assert_allclose(tree_value, full_value, atol=1e-5)
  np.testing.assert_allclose(tree_grad, full_grad, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "tree_two_level"])
def test_sharded_methods_on_a_one_device_mesh(method):
  q, k, v = _inputs(batch=2, q_len=1)
  lengths = jnp.array([24, 0])
  out, lse = make_method_attention(make_sequence_mesh(1), method=method)(q, k, v, lengths)
  want_out, want_lse = full_decode_attention_reference(q, k, v, lengths)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  np.testing.assert_allclose(lse[0], want_lse[0], atol=1e-5)
  assert np.all(np.isneginf(lse[1])) and np.all(np.asarray(out)[1] == 0)


def test_bad_configurations_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown method"):
    make_sharded_decode_attention(make_sequence_mesh(1), method="star")
  with pytest.raises(ValueError, match="two sequence axes"):
    make_sharded_decode_attention(make_sequence_mesh(1), method="tree_two_level")
  with pytest.raises(ValueError, match="not in the mesh axes"):
    make_sharded_decode_attention(make_sequence_mesh(1), sequence_axes="seq")


_SYNTHETIC_HLO = """
ENTRY %main (p0: f32[2,8], p1: bf16[4,16,2]) -> f32[2,8] {
  %p0 = f32[2,8]{1,0} parameter(0)
  %p1 = bf16[4,16,2]{2,1,0} parameter(1)
  %all-reduce.1 = (f32[2,8]{1,0}, f32[2]{0}) all-reduce(%p0, %x), replica_groups={}
  %x = f32[2]{0} constant({1, 2})
  %cp-start = (bf16[4,16,2]{2,1,0}, bf16[4,16,2]{2,1,0}, u32[], u32[]) collective-permute-start(bf16[4,16,2]{2,1,0} %p1), source_target_pairs={{0,1}}
  %cp-done = bf16[4,16,2]{2,1,0} collective-permute-done(%cp-start)
  %ag = f32[8,8]{1,0} all-gather(%p0), dimensions={0}
  ROOT %add = f32[2,8]{1,0} add(%p0, %p0)
}
"""


def test_hlo_traffic_counts_operands_once():
  traffic = collective_traffic(_SYNTHETIC_HLO)
  assert traffic["by_op"] == {
    "all-reduce": dict(bytes=4 * 16 + 4 * 2, count=1),
    "collective-permute": dict(bytes=2 * 4 * 16 * 2, count=1),
    "all-gather": dict(bytes=4 * 16, count=1),
  }


def test_tree_traffic_formula_does_not_grow_with_context():
  shapes = dict(num_devices=8, batch=2, q_len=1, heads=16, kv_heads=4, head_dim=128, kv_itemsize=2)
  tree = [formula_traffic("tree", kv_len=t, **shapes)["bytes"] for t in (2**14, 2**20)]
  ring = [formula_traffic("ring_kv", kv_len=t, **shapes)["bytes"] for t in (2**14, 2**20)]
  assert tree[0] == tree[1] == 4 * 2 * 16 * (128 + 2)
  assert ring[1] == 64 * ring[0] - 63 * 7 * 4 * 2  # K/V grow, lengths do not


def test_two_level_axes_are_taken_by_name_and_a_wrong_order_is_an_error():
  device = np.array(jax.devices()[:1]).reshape(1, 1)
  swapped = Mesh(device, ("local", "node"))
  with pytest.raises(ValueError, match=r"\('local', 'node'\).*'node' must come before"):
    make_sharded_decode_attention(swapped, method="tree_two_level")
  with pytest.raises(ValueError, match="sequence_axes=\\('local', 'node'\\)"):
    make_sharded_decode_attention(
      Mesh(device, ("node", "local")), method="tree_two_level", sequence_axes=("local", "node")
    )
  with pytest.raises(ValueError, match="node_axis='rack'.*'node', 'local'"):
    make_sharded_decode_attention(
      Mesh(device, ("node", "local")), method="tree_two_level", node_axis="rack"
    )
  # Named levels on a mesh with other names work.
  q, k, v = _inputs(batch=2, q_len=1)
  lengths = jnp.array([24, 7])
  out, lse = make_sharded_decode_attention(
    Mesh(device, ("host", "chip")), method="tree_two_level", node_axis="host", local_axis="chip"
  )(q, k, v, lengths)
  want_out, want_lse = full_decode_attention_reference(q, k, v, lengths)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("impl", [None, "xla", "pallas_interpret"])
def test_tree_decode_attention_takes_per_row_starts(impl):
  """tree_decode_attention in a user's own shard_map (one device, default
  check_vma when no Pallas kernel runs) over per-row windows [starts, ends)."""
  q, k, v = _inputs(batch=3, q_len=1)
  starts, ends = jnp.array([0, 5, 20], jnp.int32), jnp.array([24, 17, 20], jnp.int32)
  mesh = make_sequence_mesh(1)
  fn = jax.jit(
    jax.shard_map(
      lambda q, k, v, s, e: tree_decode_attention(q, k, v, e, starts=s, impl=impl),
      mesh=mesh,
      in_specs=(P(), P(None, "sequence"), P(None, "sequence"), P(), P()),
      out_specs=(P(), P()),
      check_vma=impl != "pallas_interpret",
    )
  )
  out, lse = fn(q, k, v, starts, ends)
  # The oracle over the window: drop the keys before starts by rolling them out.
  for b in range(3):
    s, e = int(starts[b]), int(ends[b])
    want_out, want_lse = full_decode_attention_reference(
      q[b : b + 1], k[b : b + 1, s:], v[b : b + 1, s:], jnp.array([e - s])
    )
    np.testing.assert_allclose(out[b : b + 1], want_out, atol=1e-5)
    np.testing.assert_allclose(lse[b : b + 1], want_lse, atol=1e-5)
