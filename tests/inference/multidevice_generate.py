"""Sharded generation on forced CPU devices, against unsharded generation.

Run in its own process by test_sharded_generation.py (never import it from
pytest):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/inference/multidevice_generate.py
Prints one JSON line per check ({"name", "ok", "detail"}), then a summary
line, and exits 1 if any check failed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bt_jax.attention import xla_attention
from bt_jax.distributed import ShardedKVCache, make_sequence_mesh, physical_slots, to_logical_order
from bt_jax.inference import generate, generate_fn, make_stream_fns, prepare_prompts
from bt_jax.inference.caches import padded_mask, padded_window
from bt_jax.models import build_model, init_params
from tests.kernel_calls import kernel_calls
from tests.multidevice import check, record, summary
from tests.utils import tiny_config

# Neither is a multiple of L_B = 4 (the last block is cut). The block model
# makes 18 blocks: with the prompt, 24 cache slots, 3 per device on 8 devices.
MAX_NEW = {"vanilla": 10, "block-L4": 70}
# Ragged: 7 and 5 are not multiples of L_B, a one-token prompt, a full 8.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [1, 2, 3, 4, 5], [20, 21, 22, 23, 24, 25, 26, 27]]
LOGITS_ATOL = 1e-4

# init_std 0.3 makes distributions peaked, so greedy argmaxes are not near-ties
# (as in test_generate.py).
TINY = dict(vocab_size=128, max_len=128, init_std=0.3)
BLOCK = dict(block_layers=2, block_width=32, token_layers=2, token_width=32, **TINY)
CONFIGS = {
  "vanilla": tiny_config("vanilla", num_layers=2, width=32, head_dim=16, **TINY),
  "block-L4": tiny_config("block", block_len=4, **BLOCK),
}


def assert_same_generation(got, want) -> float:
  """Same tokens and lengths, logits within LOGITS_ATOL; returns the max logit error."""
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  err = float(np.max(np.abs(np.asarray(got.logits) - np.asarray(want.logits))))
  assert err < LOGITS_ATOL, f"max |logit error| {err}"
  return err


def written_per_shard(cache) -> np.ndarray:
  """Slots holding a written key, per device: [num_devices] (layer 0's cache).

  A written key is the projection of a real activation, never all zeros; the
  unwritten slots are the zeros the cache was made of."""
  shards = sorted(cache[0]["key"].addressable_shards, key=lambda s: s.index[1].start)
  return np.array([int(np.any(np.asarray(s.data) != 0, axis=(0, 2, 3)).sum()) for s in shards])


def prefix_counts(num_written: int, num_shards: int) -> np.ndarray:
  """Round robin: logical slots 0..n-1 put n // p or n // p + 1 on each device."""
  return np.array([len(range(i, num_written, num_shards)) for i in range(num_shards)])


def check_model(name: str, mesh8, mesh3) -> None:
  config = CONFIGS[name]
  model = build_model(config)
  # Committed to one device, as restored parameters are: `generate(mesh=...)`
  # must place them on the mesh itself.
  params = jax.device_put(init_params(model, jax.random.key(1)), jax.devices()[0])
  slot_tokens = getattr(config, "block_len", 1)
  max_new = MAX_NEW[name]

  want = generate(model, params, PROMPTS, max_new_tokens=max_new, return_logits=True)

  # Compiled once by hand to read its HLO. Two segments: the loops read only
  # the filled logical slots, i.e. the first ceil(read / p) local slots of
  # each shard.
  batch = prepare_prompts(PROMPTS, config, max_new)
  args = jax.device_put(
    (params, batch.tokens, batch.pad, jax.random.key(0)), NamedSharding(mesh8, P())
  )
  eos_none = jax.device_put(np.int32(-1), NamedSharding(mesh8, P()))
  sharded = generate_fn(model, max_new, return_logits=True, segments=2, mesh=mesh8)
  compiled = sharded.jitted.lower(*args, eos_none).compile()
  got = compiled(*args, eos_none)

  def only_tree_collectives():
    # The cache is never gathered: the only collectives are the all-reduces
    # of the (out, lse) merge.
    ops = collections.Counter(
      re.findall(
        r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
        r"(?:-start)?\(",
        compiled.as_text(),
      )
    )
    assert ops["all-reduce"] > 0 and set(ops) == {"all-reduce"}, ops
    record(f"{name}/p8/hlo_collectives", True, dict(ops))

  check(f"{name}/p8/hlo_collectives", only_tree_collectives)

  def same_generation():
    err = assert_same_generation(got, want)
    record(f"{name}/p8/tokens_and_logits", True, f"max |logit error| {err:.2e}")

  check(f"{name}/p8/tokens_and_logits", same_generation)

  def same_with_eos():
    # EOS is traced: both calls reuse the compiled functions above.
    eos = int(np.asarray(want.tokens)[0, 3])
    a = generate(model, params, PROMPTS, max_new_tokens=max_new, eos_id=eos, return_logits=True)
    b = compiled(*args, jax.device_put(np.int32(eos), NamedSharding(mesh8, P())))
    assert np.asarray(a.lengths).min() < max_new, "EOS never met: the check is empty"
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_array_equal(np.asarray(b.lengths), np.asarray(a.lengths))
    record(f"{name}/p8/eos", True, f"lengths {np.asarray(a.lengths).tolist()}")

  check(f"{name}/p8/eos", same_with_eos)

  def three_devices():
    b = generate(model, params, PROMPTS, max_new_tokens=max_new, mesh=mesh3)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(want.tokens))
    record(f"{name}/p3/tokens", True)

  if mesh3 is not None:
    check(f"{name}/p3/tokens", three_devices)

  def pallas_decode_kernel():
    # attention_impl "pallas_interpret": each device's decode step runs the
    # split-KV kernel (Pallas interpreter) over its local window of the
    # round-robin cache (Tree Attention with per-row starts); the merged
    # result must equal the masked path.
    kernel_model = build_model(dataclasses.replace(config, attention_impl="pallas_interpret"))
    got = generate(
      kernel_model, params, PROMPTS, max_new_tokens=max_new, return_logits=True, mesh=mesh8
    )
    fn = generate_fn(kernel_model, max_new, return_logits=True, mesh=mesh8)
    calls = [
      shapes
      for kernel, shapes in kernel_calls(
        fn, params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jax.random.key(0)
      )
      if kernel == "decode_attention"
    ]
    # traced through the kernel, with starts (operands starts, ends, q, k, v)
    assert calls and all(len(shapes) == 5 for shapes in calls), calls
    err = assert_same_generation(got, want)
    record(f"{name}/p8/pallas_decode_kernel", True, f"max |logit error| {err:.2e}")

  check(f"{name}/p8/pallas_decode_kernel", pallas_decode_kernel)

  def streamed_cache():
    p = mesh8.shape["sequence"]
    args = (jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jax.random.key(0))
    start, resume, finish = make_stream_fns(model, max_new, mesh=mesh8)
    state = start(params, *args)
    cache = state["carry"]["cache"]
    cache_len = cache[0]["key"].shape[1]
    prompt_slots = batch.tokens.shape[1] // slot_tokens
    num_steps = state["tokens"].shape[1] // slot_tokens
    front = cache_len - prompt_slots - num_steps  # masked slots added for the split
    assert cache_len % p == 0 and 0 <= front < p, (cache_len, prompt_slots, num_steps)
    # Every layer's key and value: split on the slot axis, 1/p of it per device.
    for layer in cache:
      for array in layer.values():
        assert array.sharding.spec == P(None, "sequence"), array.sharding
        shapes = {s.data.shape for s in array.addressable_shards}
        assert shapes == {(array.shape[0], cache_len // p) + array.shape[2:]}, shapes
        assert len(array.addressable_shards) == p
    # The round-robin cache, put back in logical order, is the unsharded cache
    # behind the added front slots.
    ref_start, _, _ = make_stream_fns(model, max_new)
    ref_cache = ref_start(params, *args)["carry"]["cache"]
    for layer, ref_layer in zip(cache, ref_cache):
      for key in ("key", "value"):
        logical = np.asarray(to_logical_order(np.asarray(layer[key]), p))
        np.testing.assert_allclose(logical[:, front:], np.asarray(ref_layer[key]), atol=1e-5)
    # Even fill: after the prefill, half way, at the end.
    fills = []
    for stop in (0, num_steps // 2, num_steps):
      if stop:
        state = resume(params, state, stop)
      counts = written_per_shard(state["carry"]["cache"])
      expected = prefix_counts(front + prompt_slots + stop, p)
      np.testing.assert_array_equal(counts, expected, err_msg=f"after {stop} steps")
      assert counts.max() - counts.min() <= 1, counts
      fills.append(counts.tolist())
    out = finish(state)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
    record(
      f"{name}/p8/stream_cache_sharded_and_even",
      True,
      f"cache_len {cache_len}, {front} front slots, written per device {fills}",
    )

  check(f"{name}/p8/stream_cache_sharded_and_even", streamed_cache)

  def data_and_sequence():
    # A 2 x 4 (data, sequence) mesh: rows split in two groups, each group's
    # cache over 4 devices; the same tokens and logits. 3 prompts are padded
    # to 4 rows by generate and the extra row dropped.
    mesh24 = make_sequence_mesh(4, data_devices=2)
    got = generate(model, params, PROMPTS, max_new_tokens=max_new, return_logits=True, mesh=mesh24)
    err = assert_same_generation(got, want)
    three = generate(model, params, PROMPTS[:3], max_new_tokens=max_new, mesh=mesh24)
    np.testing.assert_array_equal(np.asarray(three.tokens), np.asarray(want.tokens)[:3])
    np.testing.assert_array_equal(np.asarray(three.lengths), np.asarray(want.lengths)[:3])
    start, _, _ = make_stream_fns(model, max_new, mesh=mesh24)
    state = start(params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jax.random.key(0))
    for layer in state["carry"]["cache"]:
      for array in layer.values():
        assert array.sharding.spec == P("data", "sequence"), array.sharding
        shapes = {s.data.shape for s in array.addressable_shards}
        assert shapes == {(array.shape[0] // 2, array.shape[1] // 4) + array.shape[2:]}, shapes
    assert state["tokens"].sharding.spec == P("data"), state["tokens"].sharding
    record(
      f"{name}/d2s4/rows_and_cache_split",
      True,
      f"max |logit error| {err:.2e}; cache shard {sorted(shapes)[0]}",
    )

  check(f"{name}/d2s4/rows_and_cache_split", data_and_sequence)


def check_kernel_path_with_holes(mesh8) -> None:
  """attend(decode_kernel=True) with a mask whose runs have holes: the kernel
  would attend the whole window, so the step must take the masked path; the
  result equals unsharded masked attention, and differs from the same window
  without the holes (so the check can fail). On p = 8 and on a 2 x 4 data x
  sequence mesh (rows split too)."""

  def run():
    batch, heads, head_dim, cache_len, read_len, slot = 4, 4, 16, 32, 30, 27
    keys = jax.random.split(jax.random.key(11), 5)
    query = jax.random.normal(keys[0], (batch, 1, heads, head_dim))
    new_key = jax.random.normal(keys[1], (batch, 1, heads, head_dim))
    new_value = jax.random.normal(keys[2], (batch, 1, heads, head_dim))
    logical = {
      "key": jax.random.normal(keys[3], (batch, cache_len, heads, head_dim)),
      "value": jax.random.normal(keys[4], (batch, cache_len, heads, head_dim)),
    }
    pad = jnp.array([0, 3, 9, 1], jnp.int32)
    window = padded_mask(pad, jnp.array([slot]), read_len)  # [batch, 1, read]
    holes = window.at[:2, 0, 12:17].set(False)
    outs = {}
    # On the 8-device sequence mesh, and on a 2 x 4 data x sequence mesh.
    for sharded in (
      ShardedKVCache(mesh8),
      ShardedKVCache(make_sequence_mesh(4, data_devices=2), batch_axis="data"),
    ):
      placed = physical_slots(jnp.arange(cache_len), cache_len, sharded.num_shards)
      cache = {
        k: jax.device_put(jnp.zeros_like(v).at[:, placed].set(v), sharded.cache_sharding)
        for k, v in logical.items()
      }
      # The window goes with the mask it is the run of; the mask with holes
      # has none (its caller passes no window): the masked path.
      for name, mask, runs in (
        ("window", window, padded_window(pad, slot, read_len)),
        ("holes", holes, None),
      ):
        got, _ = jax.jit(functools.partial(sharded.attend, impl="pallas_interpret"))(
          query, new_key, new_value, cache, jnp.int32(slot), mask, window=runs
        )
        full = {
          k: v.at[:, slot].set(n[:, 0]) for (k, v), n in zip(logical.items(), (new_key, new_value))
        }
        want = xla_attention(
          query, full["key"][:, :read_len], full["value"][:, :read_len], causal=False, mask=mask
        )
        err = float(jnp.max(jnp.abs(got - want)))
        assert err < 1e-5, (name, dict(sharded.mesh.shape), err)
        outs[name] = want
    gap = float(jnp.max(jnp.abs(outs["holes"][:2] - outs["window"][:2])))
    assert gap > 1e-3, gap
    record(
      "attend/p8/kernel_path_mask_with_holes",
      True,
      f"max error {err:.2e}; holes change rows 0-1 by {gap:.2f}",
    )

  check("attend/p8/kernel_path_mask_with_holes", run)


def main() -> int:
  if len(jax.devices()) < 8:
    record(
      "devices",
      False,
      f"need 8 devices, have {len(jax.devices())}; set XLA_FLAGS="
      "--xla_force_host_platform_device_count=8",
    )
    return 1
  mesh8 = make_sequence_mesh(8)
  mesh3 = make_sequence_mesh(3)
  for name in CONFIGS:
    check_model(name, mesh8, mesh3 if name == "vanilla" else None)
  check_kernel_path_with_holes(mesh8)
  return summary()


if __name__ == "__main__":
  sys.exit(main())
