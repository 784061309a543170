"""Cached generation against the full forward, EOS, sampling, prompt checks."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.attention import window_mask
from bt_jax.config import BlockConfig, StackConfig
from bt_jax.inference import (
  SamplingConfig,
  generate,
  make_stream_fns,
  prepare_prompts,
  restrict_logits,
  sample_logits,
)
from bt_jax.inference.caches import local_mask, local_window, padded_mask, padded_window
from bt_jax.layers import Attention
from bt_jax.models import build_model, init_params
from tests.kernel_calls import kernel_calls
from tests.utils import tiny_config

VOCAB = 128
MAX_LEN = 64
BUFFER = 48  # the reference's fixed length: a multiple of every L_B here
MAX_NEW = 10  # not a multiple of 4 or 8: the last block is cut
# Ragged: 7 and 5 are not multiples of L_B, a one-token prompt, a full 8.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [1, 2, 3, 4, 5], [20, 21, 22, 23, 24, 25, 26, 27]]

# init_std 0.3 makes distributions peaked, so greedy argmaxes are not near-ties.
TINY = dict(vocab_size=VOCAB, max_len=MAX_LEN, init_std=0.3)
BLOCK = dict(block_layers=2, block_width=32, token_layers=2, token_width=32, **TINY)
CONFIGS = {
  "vanilla": tiny_config("vanilla", num_layers=2, width=32, **TINY),
  "block-L1": tiny_config("block", block_len=1, **BLOCK),
  "block-L2": tiny_config("block", block_len=2, **BLOCK),
  "block-L4": tiny_config("block", block_len=4, **BLOCK),
  "block-L8-P3": tiny_config("block", block_len=8, prefix_len=3, **BLOCK),
  "block-L4-summation-encoder": tiny_config(
    "block",
    block_len=4,
    token_decoder="summation",
    embedder="encoder",
    encoder_layers=1,
    encoder_width=32,
    **BLOCK,
  ),
  "block-L2-cross-projection": tiny_config(
    "block", block_len=2, token_decoder="cross_attention", embedder="projection", **BLOCK
  ),
  # Prefill through the attention_impl dispatch (flash_attention's API; its
  # XLA path on CPU), decode steps through the masked cache.
  "vanilla-pallas": tiny_config("vanilla", num_layers=2, width=32, attention_impl="pallas", **TINY),
  "block-L4-pallas": tiny_config("block", block_len=4, attention_impl="pallas", **BLOCK),
}


@functools.lru_cache(maxsize=None)
def model_and_params(name):
  model = build_model(CONFIGS[name])
  return model, init_params(model, jax.random.key(1))


@functools.lru_cache(maxsize=None)
def forward(name):
  model, _ = model_and_params(name)
  return jax.jit(model.apply)


def aligned_rows(config, prompts):
  """Each prompt alone, left-padded to a block boundary (what the model sees)."""
  block_len = getattr(config, "block_len", 1)
  return [[config.pad_id] * (-len(p) % block_len) + list(p) for p in prompts]


def next_token_logits(config, logits, index):
  """Full-forward logits that predict position `index` of each row: [batch, vocab]."""
  if isinstance(config, BlockConfig):
    flat = logits.reshape(logits.shape[0], -1, config.vocab_size)  # predicts tokens L..
    return flat[np.arange(len(index)), index - config.block_len]
  return logits[np.arange(len(index)), index - 1]


def recompute_greedy(name, prompts, max_new):
  """Greedy decoding by running the full training forward at every step.

  Rows sit at the start of a fixed buffer; the forward is causal, so what lies
  right of a row does not change its logits."""
  model, params = model_and_params(name)
  rows = aligned_rows(model.config, prompts)
  buf = np.zeros((len(rows), BUFFER), np.int32)
  for b, row in enumerate(rows):
    buf[b, : len(row)] = row
  index = np.array([len(r) for r in rows])
  out = []
  for _ in range(max_new):
    logits = np.asarray(forward(name)({"params": params}, jnp.asarray(buf)))
    token = next_token_logits(model.config, logits, index).argmax(-1)
    buf[np.arange(len(rows)), index] = token
    out.append(token)
    index = index + 1
  return np.stack(out, axis=1), logits


# Decode loops split into segments that read only the filled part of the cache.
SEGMENTS = {"vanilla": 3, "block-L4": 2}


def run(name, prompts=PROMPTS, **kwargs):
  """generate with the settings of the exactness test: one compile per model."""
  model, params = model_and_params(name)
  return generate(
    model,
    params,
    prompts,
    max_new_tokens=MAX_NEW,
    return_logits=True,
    segments=SEGMENTS.get(name, 1),
    **kwargs,
  )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_matches_full_forward(name):
  model, _ = model_and_params(name)
  out = run(name)
  expected, final_logits = recompute_greedy(name, PROMPTS, MAX_NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  np.testing.assert_array_equal(np.asarray(out.lengths), [MAX_NEW] * len(PROMPTS))
  # The last recompute forward saw every generated token but the last: its
  # logits at every generated position are the full-forward logits.
  start = np.array([len(r) for r in aligned_rows(model.config, PROMPTS)])
  full = np.stack(
    [next_token_logits(model.config, final_logits, start + i) for i in range(MAX_NEW)], axis=1
  )
  np.testing.assert_allclose(np.asarray(out.logits), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vanilla", "block-L4"])
def test_eos_stops_each_row(name):
  model, _ = model_and_params(name)
  free = np.asarray(run(name).tokens)
  eos = int(free[0, 2])  # row 0 ends at its third token
  out = run(name, eos_id=eos)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  assert lengths[0] <= 3
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free[b] == eos)
    want = hits[0] + 1 if hits.size else MAX_NEW
    assert lengths[b] == want
    np.testing.assert_array_equal(tokens[b, :want], free[b, :want])
    assert (tokens[b, want:] == model.config.pad_id).all()  # a finished row stops changing


def test_eos_in_every_row_ends_the_loop():
  same = [PROMPTS[3]] * len(PROMPTS)
  first = int(np.asarray(run("block-L2", same).tokens)[0, 0])
  out = run("block-L2", same, eos_id=first)
  np.testing.assert_array_equal(np.asarray(out.lengths), [1] * len(same))
  assert (np.asarray(out.tokens)[:, 1:] == 0).all()


@pytest.mark.parametrize("name", ["vanilla", "block-L4"])
def test_sampling_is_deterministic_per_seed(name):
  model, params = model_and_params(name)
  sampling = SamplingConfig(temperature=3.0, top_k=50, top_p=0.95)
  runs = [
    np.asarray(
      generate(model, params, PROMPTS, max_new_tokens=MAX_NEW, sampling=sampling, seed=seed).tokens
    )
    for seed in (7, 7, 8)
  ]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert (runs[0] != runs[2]).any()


def test_top_k_and_top_p_restrict_the_support():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  logits = jnp.asarray(np.log(probs))[None]
  finite = lambda s: np.flatnonzero(np.isfinite(np.asarray(restrict_logits(logits, s))[0]))
  np.testing.assert_array_equal(finite(SamplingConfig(1.0, top_k=2)), [0, 1])
  np.testing.assert_array_equal(finite(SamplingConfig(1.0, top_p=0.7)), [0, 1])
  np.testing.assert_array_equal(finite(SamplingConfig(1.0, top_p=0.5)), [0])
  np.testing.assert_array_equal(finite(SamplingConfig(1.0, top_p=0.81)), [0, 1, 2])
  np.testing.assert_array_equal(finite(SamplingConfig(1.0, top_k=3, top_p=0.7)), [0, 1])
  # Many draws over a flat 64-way distribution stay inside the top 5.
  flat = jax.random.normal(jax.random.key(0), (4096, 64))
  draws = sample_logits(flat, jax.random.key(1), SamplingConfig(1.0, top_k=5))
  top5 = np.argsort(-np.asarray(flat), axis=1)[:, :5]
  assert (np.asarray(draws)[:, None] == top5).any(axis=1).all()
  draws = sample_logits(flat, jax.random.key(2), SamplingConfig(1.0, top_p=0.3))
  sorted_p = np.sort(np.asarray(jax.nn.softmax(flat)), axis=1)[:, ::-1]
  chosen_p = np.take_along_axis(np.asarray(jax.nn.softmax(flat)), np.asarray(draws)[:, None], 1)
  keep = (np.cumsum(sorted_p, 1) - sorted_p) < 0.3
  min_kept = np.where(keep, sorted_p, np.inf).min(1)
  assert (chosen_p[:, 0] >= min_kept - 1e-7).all()


def test_streaming_chunks_match_generate():
  model, params = model_and_params("block-L4")
  batch = prepare_prompts(PROMPTS, model.config, MAX_NEW)
  start, resume, finish = make_stream_fns(model, MAX_NEW, segments=2)
  state = start(params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jax.random.key(0))
  for stop in (1, 2, 3):
    state = resume(params, state, stop)
    assert int(state["step"]) == stop
  state = resume(params, state, 3)  # already there: no step
  assert int(state["step"]) == 3
  np.testing.assert_array_equal(
    np.asarray(finish(state).tokens), np.asarray(run("block-L4").tokens)
  )


def test_pallas_token_decoder_layout_matches_xla():
  for name in ("block-L4", "block-L4-summation-encoder"):
    model, params = model_and_params(name)
    pallas = build_model(dataclasses.replace(model.config, attention_impl="pallas"))
    tokens = jax.random.randint(jax.random.key(3), (len(PROMPTS), BUFFER), 0, VOCAB)
    want = forward(name)({"params": params}, tokens)
    got = jax.jit(pallas.apply)({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_pallas_local_block_kernel_in_interpret_mode():
  """The one-long-row layout through the Pallas kernel itself (interpreter)."""
  model, params = model_and_params("block-L4")
  pallas = build_model(dataclasses.replace(model.config, attention_impl="pallas_interpret"))
  tokens = jax.random.randint(jax.random.key(4), (1, 16), 0, VOCAB)
  want = forward("block-L4")({"params": params}, tokens)
  got = jax.jit(pallas.apply)({"params": params}, tokens)
  calls = kernel_calls(pallas.apply, {"params": params}, tokens)
  # One row of m * (P + L - 1) positions (local_block 5), not m rows: every
  # flash call has the batch of the tokens, 1.
  assert calls and all(name.startswith("flash") and shapes[0][0] == 1 for name, shapes in calls), (
    calls
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_decoder_windows_are_the_runs_of_their_masks():
  """The windows the decoders pass agree with the masks they pass, row by row."""
  pad = jnp.array([0, 5, 20, 38], jnp.int32)
  for slot, read_len in ((37, 40), (0, 8), (39, 40), (45, 40)):
    want = padded_mask(pad, jnp.array([slot]), read_len)[:, 0]
    np.testing.assert_array_equal(window_mask(*padded_window(pad, slot, read_len), read_len), want)
    want = jnp.broadcast_to(local_mask(jnp.array([slot]), read_len)[:, 0], (4, read_len))
    np.testing.assert_array_equal(window_mask(*local_window(4, slot, read_len), read_len), want)


def _decode_kernels(calls):
  return [shapes for name, shapes in calls if name == "decode_attention"]


def test_pallas_decode_step_kernel_with_left_padding():
  """A decode step's Attention through the split-KV kernel itself
  (interpreter) with per-row starts from a left-padded window, against the
  xla path. Masked slots hold random keys/values, so a wrong window shows.
  The interpreter's 16-slot tiles: a pad of 20 skips a whole tile and masks
  inside the next."""
  stack = StackConfig(num_layers=1, width=64, head_dim=16)
  batch, cache_len, read_len, slot = 4, 48, 40, 37
  # Row 3's pad lies past the slot: it sees nothing (out is the bias only).
  pad = jnp.array([0, 5, 20, 38], jnp.int32)
  keys = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(keys[0], (batch, 1, stack.width))
  shape = (batch, cache_len, stack.num_heads, stack.resolved_head_dim)
  cache = {"key": jax.random.normal(keys[1], shape), "value": jax.random.normal(keys[2], shape)}
  positions = jnp.maximum(slot - pad, 0)[:, None]
  masks = {
    "padded": padded_mask(pad, jnp.array([slot]), read_len),  # [batch, 1, read]
    "local": local_mask(jnp.array([slot]), read_len),
  }  # [1, 1, read]
  windows = {
    "padded": padded_window(pad, slot, read_len),
    "local": local_window(batch, slot, read_len),
  }
  # Holes inside rows 0 and 1's runs: not one run per row, so its caller
  # passes no window and it takes the masked path.
  masks["holes"] = masks["padded"].at[:2, 0, 10:14].set(False)
  windows["holes"] = None
  params = Attention(stack).init(
    jax.random.key(6), x, positions, mask=masks["padded"], cache=cache, cache_index=slot
  )
  results = {}
  for name, mask in masks.items():
    outs = {}
    for impl in ("xla", "pallas_interpret"):
      layer = Attention(stack, attention_impl=impl)
      args = (params, x, positions)
      kwargs = dict(mask=mask, cache=cache, cache_index=jnp.int32(slot), window=windows[name])
      outs[impl] = jax.jit(layer.apply)(*args, **kwargs)
      if impl != "xla":
        kernels = _decode_kernels(kernel_calls(layer.apply, *args, **kwargs))
        if windows[name] is None:
          assert not kernels, name
        else:  # one call, with the starts operand (starts, ends, q, k, v)
          assert len(kernels) == 1 and len(kernels[0]) == 5, (name, kernels)
    np.testing.assert_allclose(
      np.asarray(outs["pallas_interpret"][0]),
      np.asarray(outs["xla"][0]),
      atol=1e-5,
      rtol=1e-5,
      err_msg=name,
    )
    for part in ("key", "value"):
      np.testing.assert_array_equal(
        np.asarray(outs["pallas_interpret"][1][part]), np.asarray(outs["xla"][1][part])
      )
    results[name] = np.asarray(outs["xla"][0])
  # The holes matter: over the same window without them, rows 0-1 differ.
  assert np.abs(results["holes"][:2] - results["padded"][:2]).max() > 1e-3
  np.testing.assert_array_equal(results["holes"][2:], results["padded"][2:])


def test_pallas_multi_query_step_splits_context_and_new_keys():
  """A cached step of several queries (a packed draft tree, a causal chunk)
  with the kernels (interpreter): the decode kernel over the shared context
  window merged with attention over the new keys, against the xla path, with
  a slot per row. Masks of another form (their callers pass no window) take
  the jnp path: no kernel is traced for them."""
  stack = StackConfig(num_layers=1, width=64, head_dim=16)
  batch, cache_len, length = 3, 48, 5
  pad = jnp.array([0, 6, 19], jnp.int32)
  index = jnp.array([30, 21, 40], jnp.int32)  # a committed length per row
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], (batch, length, stack.width))
  shape = (batch, cache_len, stack.num_heads, stack.resolved_head_dim)
  cache = {"key": jax.random.normal(keys[1], shape), "value": jax.random.normal(keys[2], shape)}
  depth = jnp.array([0, 1, 2, 1, 2])
  positions = (index - pad)[:, None] + depth[None, :]
  # An example tree: 0 <- 1 <- 2, 0 <- 3 <- 4 (each sees its ancestors).
  tree = jnp.array(
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]], bool
  )
  slots = jnp.arange(cache_len)
  context = (slots[None, :] >= pad[:, None]) & (slots[None, :] < index[:, None])  # [b, S]
  relative = slots[None, :] - index[:, None]

  def with_new(new_part):  # new_part [length, length] -> mask [b, length, S]
    visible = new_part[:, jnp.clip(relative, 0, length - 1)]  # [length, b, S]
    inside = (relative >= 0) & (relative < length)
    return context[:, None, :] | (jnp.transpose(visible, (1, 0, 2)) & inside[:, None, :])

  masks = {"tree": with_new(tree), "causal": with_new(jnp.tril(jnp.ones((5, 5), bool)))}
  masks["holes"] = masks["tree"].at[0, :, 10:12].set(False)
  masks["per-query"] = masks["tree"].at[1, 2, 8].set(False)  # one query differs
  masks["beyond"] = masks["tree"].at[2, :, 46].set(True)  # past the new keys
  split = {"tree": True, "causal": True, "holes": False, "per-query": False, "beyond": False}
  window = (pad, index)
  # The window is exactly the context part of the split masks.
  for name in ("tree", "causal"):
    seen_context = masks[name] & (slots < index[:, None])[:, None, :]
    np.testing.assert_array_equal(
      seen_context, jnp.broadcast_to(window_mask(*window, cache_len)[:, None], seen_context.shape)
    )
  params = Attention(stack).init(
    jax.random.key(8), x, positions, mask=masks["tree"], cache=cache, cache_index=index
  )
  fns = {impl: Attention(stack, attention_impl=impl).apply for impl in ("xla", "pallas_interpret")}
  for name, mask in masks.items():
    kwargs = dict(mask=mask, cache=cache, cache_index=index, window=window if split[name] else None)
    outs = {impl: jax.jit(fn)(params, x, positions, **kwargs) for impl, fn in fns.items()}
    kernels = _decode_kernels(kernel_calls(fns["pallas_interpret"], params, x, positions, **kwargs))
    # The split path: one decode kernel call holding the step's 5 queries.
    assert bool(kernels) == split[name], (name, kernels)
    np.testing.assert_allclose(
      np.asarray(outs["pallas_interpret"][0]),
      np.asarray(outs["xla"][0]),
      atol=1e-5,
      rtol=1e-5,
      err_msg=name,
    )
    for part in ("key", "value"):
      np.testing.assert_array_equal(
        np.asarray(outs["pallas_interpret"][1][part]), np.asarray(outs["xla"][1][part])
      )


def test_prompt_errors():
  config = CONFIGS["block-L4"]
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    prepare_prompts([[1], []], config, 4)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    prepare_prompts([[VOCAB]], config, 4)
  with pytest.raises(ValueError, match="exceeds the model's context max_len 64"):
    prepare_prompts([[1] * 61], config, 4)  # padded to 64, no room left
  prepare_prompts([[1] * 60], config, 4)  # exactly fills the context
  with pytest.raises(ValueError, match="rounded up to whole blocks: 8"):
    prepare_prompts([[1] * 57], config, 5)  # 60 + 8 > 64
  with pytest.raises(ValueError, match="max_new_tokens"):
    prepare_prompts([[1]], config, 0)
