"""Generation with the KV cache sharded over the `sequence` axis (issue 6, item 3).

The layout and the per-device attention are checked here; generation on 8
forced CPU devices runs in its own process (multidevice_generate.py), since
the forced-device flag must never be set in the pytest process and a
multi-device process can hang on 2 cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from bt_jax.attention import xla_attention
from bt_jax.distributed import (
  ShardedKVCache,
  make_sequence_mesh,
  masked_partial_attention,
  merge_many,
  physical_slots,
  round_robin_mask,
  to_logical_order,
)
from bt_jax.inference import generate, generate_fn, make_stream_fns
from bt_jax.models import build_model
from tests.multidevice import run_check_script
from tests.utils import tiny_config


@pytest.mark.parametrize("cache_len,num_shards", [(12, 4), (24, 8), (9, 3), (5, 1)])
def test_slots_are_dealt_round_robin(cache_len, num_shards):
  logical = np.arange(cache_len)
  physical = np.asarray(physical_slots(jnp.asarray(logical), cache_len, num_shards))
  assert sorted(physical.tolist()) == logical.tolist()  # a permutation
  shard_len = cache_len // num_shards
  np.testing.assert_array_equal(physical // shard_len, logical % num_shards)
  np.testing.assert_array_equal(physical % shard_len, logical // num_shards)
  # Any filled prefix spreads evenly: devices differ by at most one slot.
  for filled in range(cache_len + 1):
    counts = np.bincount(physical[:filled] // shard_len, minlength=num_shards)
    assert counts.max() - counts.min() <= 1, (filled, counts)
  # to_logical_order undoes the placement.
  stored = np.zeros(cache_len, np.int32)
  stored[physical] = logical
  np.testing.assert_array_equal(
    np.asarray(to_logical_order(jnp.asarray(stored)[None], num_shards)), logical[None]
  )


def test_slot_placement_needs_a_multiple_of_the_shards():
  with pytest.raises(ValueError, match="cache_len 10 is not a multiple of the 4 shards"):
    physical_slots(jnp.arange(10), 10, 4)


@pytest.mark.parametrize("read_len", [12, 10, 1])
def test_round_robin_mask_puts_each_slot_on_its_device(read_len):
  num_shards = 4
  mask = jax.random.bernoulli(jax.random.key(0), 0.6, (2, 3, read_len))
  placed = np.asarray(round_robin_mask(mask, num_shards))
  mask = np.asarray(mask)
  per_shard = -(-read_len // num_shards)
  assert placed.shape == (2, 3, num_shards * per_shard)
  for shard in range(num_shards):
    for local in range(per_shard):
      slot = local * num_shards + shard
      want = mask[..., slot] if slot < read_len else False
      np.testing.assert_array_equal(placed[..., shard * per_shard + local], want)


def test_masked_partials_merge_to_full_attention():
  """Per-device partials over disjoint key sets, merged, are the attention."""
  keys = jax.random.split(jax.random.key(2), 4)
  batch, q_len, heads, kv_heads, head_dim, kv_len = 2, 3, 4, 2, 8, 12
  query = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
  key = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
  value = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim))
  mask = np.array(jax.random.bernoulli(keys[3], 0.5, (batch, q_len, kv_len)))
  mask[:, :, 4:8] = False  # the middle shard has no visible key
  mask[1, 2] = False  # a query that sees nothing at all
  mask = jnp.asarray(mask)
  partial = jax.jit(masked_partial_attention)  # one compile, not one per op
  partials = [
    partial(query, key[:, s : s + 4], value[:, s : s + 4], mask[..., s : s + 4]) for s in (0, 4, 8)
  ]
  assert np.all(np.isneginf(np.asarray(partials[1][1])))
  assert not np.isnan(np.asarray(partials[1][0])).any()
  out, lse = jax.jit(merge_many)(partials)
  want = jax.jit(xla_attention, static_argnames="causal")(
    query, key, value, causal=False, mask=mask
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
  assert np.all(np.asarray(out[1, 2]) == 0) and np.isneginf(np.asarray(lse[1, :, 2])).all()


def _tiny_vanilla():
  return build_model(tiny_config("vanilla", num_layers=1, width=32, vocab_size=64, max_len=32))


def test_a_mesh_without_a_sequence_axis_is_an_error():
  model = _tiny_vanilla()
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  message = r"the mesh has no 'sequence' axis .* its axes are \('data',\)"
  with pytest.raises(ValueError, match=message):
    generate(model, None, [[1, 2]], max_new_tokens=2, mesh=mesh)
  with pytest.raises(ValueError, match=message):
    generate_fn(model, 2, mesh=mesh)
  with pytest.raises(ValueError, match=message):
    make_stream_fns(model, 2, mesh=mesh)
  with pytest.raises(ValueError, match=message):
    ShardedKVCache(mesh)


def test_data_axis_errors_name_the_bad_value():
  mesh = make_sequence_mesh(1)
  with pytest.raises(
    ValueError,
    match=r"batch_axis='data' must be a mesh axis other than "
    r"'sequence'; the mesh's axes are \('sequence',\)",
  ):
    ShardedKVCache(mesh, batch_axis="data")
  with pytest.raises(ValueError, match=r"data_devices must be in \[1, 1\]; got 2"):
    make_sequence_mesh(1, data_devices=2)
  two_axes = Mesh(
    np.array(jax.devices()[:1]).reshape(1, 1), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2
  )
  sharded = ShardedKVCache(two_axes, batch_axis="data")
  assert sharded.batch_shards == 1 and sharded.cache_sharding.spec == P("data", "sequence")
  sharded.check_batch(3)  # one row group: any batch


@pytest.mark.multidevice
def test_sharded_generation_matches_unsharded_on_8_devices():
  """Vanilla and Block (L_B = 4) on 8 (and 3) CPU devices: same tokens, logits
  within 1e-4, cache split 1/p per device, shards filled evenly; with
  attention_impl "pallas" each device's decode step runs the interpret-mode
  split-KV kernel over its local window, with the same result; a decode mask
  with holes takes the masked path and stays exact; on a 2 x 4 data x
  sequence mesh the rows are split too, with the same result."""
  run_check_script("tests/inference/multidevice_generate.py", checks=14)
