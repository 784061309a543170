"""Foundation tests: causality, locality, loss/scoring agreement, dtypes, a
numpy re-implementation of the GPT-NeoX layer, and the errors of bad input."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.config import BlockConfig, StackConfig, head_dim_for_width
from bt_jax.models import block_aligned, build_model, init_params, sequence_loss, token_logprobs
from tests.utils import tiny_config

VOCAB = 61
TINY_BLOCK = dict(
  vocab_size=VOCAB,
  max_len=64,
  block_layers=2,
  block_width=64,
  token_layers=2,
  token_width=64,
  encoder_layers=1,
  encoder_width=32,
)
TINY_VANILLA = dict(vocab_size=VOCAB, max_len=64, num_layers=2, width=64)

# Every embedder (with the default strategy), every strategy (with the default
# embedder), and block lengths 1, 2, 4, 8: not the full cross product, to keep
# compiles few.
BLOCK_VARIANTS = {
  "lookup-prefix-L4": dict(),
  "projection-prefix-L4": dict(embedder="projection"),
  "encoder-prefix-L4": dict(embedder="encoder"),
  "lookup-summation-L4": dict(token_decoder="summation"),
  "lookup-cross-L4": dict(token_decoder="cross_attention"),
  "lookup-prefix-L1": dict(block_len=1),
  "lookup-prefix-L2": dict(block_len=2),
  "lookup-prefix-L8-P3": dict(block_len=8, prefix_len=3),
  "encoder-summation-L2": dict(embedder="encoder", token_decoder="summation", block_len=2),
}


def make_config(name: str):
  if name == "vanilla":
    return tiny_config("vanilla", **TINY_VANILLA)
  return tiny_config("block", **{**TINY_BLOCK, **BLOCK_VARIANTS[name]})


@functools.lru_cache(maxsize=None)
def model_and_params(name: str):
  model = build_model(make_config(name))
  return model, init_params(model, jax.random.key(hash(name) % 1000))


@functools.lru_cache(maxsize=None)
def jitted_logprobs(name: str):
  model, _ = model_and_params(name)
  return jax.jit(lambda p, t, m: token_logprobs(model, p, t, m))


ALL_MODELS = ["vanilla"] + list(BLOCK_VARIANTS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_causality(name):
  """Changing token j never changes the log-prob of any token before j."""
  model, params = model_and_params(name)
  length = 19  # not a multiple of any block length: token_logprobs aligns internally
  rng = np.random.default_rng(0)
  base = rng.integers(0, VOCAB, size=length)
  positions = [0, 3, 8, 13, 18]
  rows = [base]
  for j in positions:
    row = base.copy()
    row[j] = (row[j] + 1 + rng.integers(0, VOCAB - 1)) % VOCAB
    rows.append(row)
  tokens = jnp.asarray(np.stack(rows), jnp.int32)
  lp, valid = jitted_logprobs(name)(params, tokens, jnp.ones_like(tokens))
  lp = np.asarray(lp)
  for i, j in enumerate(positions, start=1):
    np.testing.assert_allclose(
      lp[i, :j],
      lp[0, :j],
      atol=1e-5,
      rtol=0,
      err_msg=f"{name}: changing token {j} changed an earlier log-prob",
    )
    # Non-vacuous: the change is seen from position j on.
    if j >= 1:
      assert abs(lp[i, j] - lp[0, j]) > 1e-6, f"{name}: token {j}'s own log-prob did not change"
    if j + 1 < length:
      assert np.max(np.abs(lp[i, j + 1 :] - lp[0, j + 1 :])) > 1e-6, (
        f"{name}: changing token {j} changed nothing after it"
      )
  np.testing.assert_array_equal(np.asarray(valid[0]), np.arange(length) >= 1)


@pytest.mark.parametrize("name", ["lookup-prefix-L4", "lookup-summation-L4", "lookup-cross-L4"])
def test_locality(name):
  """A token sees earlier blocks only through the context embedding."""
  model, params = model_and_params(name)
  block_len = model.config.block_len
  tokens = jax.random.randint(jax.random.key(3), (1, 6 * block_len), 0, VOCAB)
  variables = {"params": params}
  blocks = tokens.reshape(1, 6, block_len)
  context = model.apply(variables, blocks, method="context_embeddings")
  decode = jax.jit(lambda c, b: model.apply(variables, c, b, method="decode_blocks"))
  logits = decode(context[:, :-1], blocks[:, 1:])
  # The decomposition is the model.
  np.testing.assert_allclose(logits, model.apply(variables, tokens), atol=1e-5)

  # Perturbing the block decoder's output for block 2 changes block 3's logits only.
  bumped = context.at[:, 2].add(0.5)
  logits_ctx = decode(bumped[:, :-1], blocks[:, 1:])
  diff = np.max(np.abs(np.asarray(logits_ctx - logits)), axis=(0, 2, 3))  # per target block
  assert diff[2] > 1e-4 and np.all(np.delete(diff, 2) == 0), diff

  # With the context embeddings held fixed, the tokens of earlier blocks are invisible.
  other = jax.random.randint(jax.random.key(4), blocks.shape, 0, VOCAB)
  mixed = blocks.at[:, :3].set(other[:, :3])  # change blocks 0..2, keep 3..5
  logits_mixed = decode(context[:, :-1], mixed[:, 1:])
  np.testing.assert_array_equal(logits_mixed[:, 2:], logits[:, 2:])

  # Inside a block: changing token j changes only logits of positions > j.
  changed = blocks.at[:, 4, 1].set((blocks[0, 4, 1] + 1) % VOCAB)
  logits_tok = decode(context[:, :-1], changed[:, 1:])
  per_pos = np.max(np.abs(np.asarray(logits_tok - logits)), axis=(0, 3))  # [blocks, L]
  assert np.all(per_pos[3, :2] == 0) and per_pos[3, 2] > 1e-5
  assert np.all(np.delete(per_pos, 3, axis=0) == 0)


@pytest.mark.parametrize("name", ["vanilla", "lookup-prefix-L4", "lookup-prefix-L2"])
def test_loss_equals_mean_negative_token_logprobs(name):
  model, params = model_and_params(name)
  rng = np.random.default_rng(1)
  lengths = [13, 20, 7]
  width = 20
  tokens = np.zeros((3, width), np.int32)
  mask = np.zeros((3, width), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(1, VOCAB, size=n)
    mask[i, :n] = 1
  lp, valid = token_logprobs(model, params, jnp.asarray(tokens), jnp.asarray(mask))
  expected = -np.sum(np.asarray(lp) * np.asarray(valid)) / np.sum(np.asarray(valid))
  assert np.sum(np.asarray(valid)) == sum(n - 1 for n in lengths)
  if isinstance(model.config, BlockConfig):
    # The training input is the section-6 alignment; block 0 is never a target.
    train_tokens, train_mask = block_aligned(
      jnp.asarray(tokens), jnp.asarray(mask), model.config.block_len, 0
    )
    # The pseudo-EOS right pad is a target in training but not a scored token here.
    start = model.config.block_len - 1
    train_mask = train_mask.at[:, start + width :].set(0)
    pseudo = np.asarray(
      block_aligned(jnp.asarray(tokens), jnp.asarray(mask), model.config.block_len, 0)[1]
    )
    train_mask = jnp.where(jnp.arange(train_mask.shape[1]) >= start, train_mask, 0)
    train_mask = train_mask * (jnp.asarray(pseudo) * 0 + 1)
    real = jnp.zeros_like(train_mask).at[:, start : start + width].set(jnp.asarray(mask))
    loss, aux = sequence_loss(model, params, train_tokens, real)
  else:
    loss, aux = sequence_loss(model, params, jnp.asarray(tokens), jnp.asarray(mask))
  assert float(aux["num_tokens"]) == np.sum(np.asarray(valid))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_block_loss_never_targets_block_zero():
  model, params = model_and_params("lookup-prefix-L4")
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, VOCAB)
  mask = jnp.ones_like(tokens)
  _, aux = sequence_loss(model, params, tokens, mask)
  weights = np.asarray(aux["weights"])
  assert np.all(weights[:, :4] == 0) and np.all(weights[:, 4:] == 1)
  # Pads (mask 0) are never targets either.
  _, aux = sequence_loss(model, params, tokens, mask.at[:, 9:11].set(0))
  assert np.all(np.asarray(aux["weights"])[:, 9:11] == 0) and float(aux["num_tokens"]) == 20


@pytest.mark.parametrize("name", ["vanilla", "lookup-prefix-L4"])
def test_bf16_forward_is_finite_and_close(name):
  model, params = model_and_params(name)
  bf16 = build_model(dataclasses.replace(model.config, dtype="bfloat16"))
  tokens = jax.random.randint(jax.random.key(6), (2, 24), 0, VOCAB)
  lp32, valid = token_logprobs(model, params, tokens)
  lp16, _ = token_logprobs(bf16, params, tokens)
  assert np.all(np.isfinite(np.asarray(lp16)))
  err = np.abs(np.asarray(lp16) - np.asarray(lp32))[np.asarray(valid)]
  assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())
  # Parameters in bf16 too.
  bf16_all = build_model(
    dataclasses.replace(model.config, dtype="bfloat16", param_dtype="bfloat16")
  )
  p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  lp16b, _ = token_logprobs(bf16_all, p16, tokens)
  assert np.all(np.isfinite(np.asarray(lp16b)))
  assert np.abs(np.asarray(lp16b) - np.asarray(lp32))[np.asarray(valid)].mean() < 0.05


# ---------------------------------------------------------------- numpy reference


def _np_layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_rotary(x, rot, base=10000.0):
  """HF GPT-NeoX: cos/sin over concat(freqs, freqs), rotate_half on the first rot dims."""
  length = x.shape[0]
  inv_freq = 1.0 / base ** (np.arange(0, rot, 2) / rot)
  freqs = np.outer(np.arange(length), inv_freq)
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
  xr, xp = x[..., :rot], x[..., rot:]
  half = np.concatenate([-xr[..., rot // 2 :], xr[..., : rot // 2]], -1)
  return np.concatenate([xr * cos + half * sin, xp], -1)


def _np_neox_layer(x, p, rot):
  """x [length, D]: x + attn(ln1 x) + mlp(ln2 x), written independently of the flax code."""

  def attn(h):
    q = (
      np.einsum("ld,dhk->lhk", h, p["attention"]["query"]["kernel"])
      + p["attention"]["query"]["bias"]
    )
    k = np.einsum("ld,dhk->lhk", h, p["attention"]["key"]["kernel"]) + p["attention"]["key"]["bias"]
    v = (
      np.einsum("ld,dhk->lhk", h, p["attention"]["value"]["kernel"])
      + p["attention"]["value"]["bias"]
    )
    q, k = _np_rotary(q, rot), _np_rotary(k, rot)
    s = np.einsum("qhk,shk->hqs", q, k) / math.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((len(h), len(h)), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("hqs,shk->qhk", w, v)
    return (
      np.einsum("qhk,hkd->qd", o, p["attention"]["out"]["kernel"]) + p["attention"]["out"]["bias"]
    )

  def mlp(h):
    a = h @ p["mlp"]["wi"]["kernel"] + p["mlp"]["wi"]["bias"]
    a = 0.5 * a * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))
    return a @ p["mlp"]["wo"]["kernel"] + p["mlp"]["wo"]["bias"]

  return x + attn(_np_layer_norm(x, p["ln_attention"])) + mlp(_np_layer_norm(x, p["ln_mlp"]))


def test_vanilla_matches_numpy_gpt_neox():
  model, params = model_and_params("vanilla")
  # Random (non-zero) biases and norms so that every term is exercised.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree_util.tree_unflatten(
    treedef, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  )
  tokens = np.array([[5, 17, 3, 60, 0, 22, 9, 41, 33, 2, 8]], np.int32)
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = p["token_embed"]["embedding"][tokens[0]]
  rot = model.config.stack.rotary_dims
  assert rot == 8  # 25% of head_dim 32
  for i in range(model.config.num_layers):
    x = _np_neox_layer(x, p["decoder"][f"layer_{i}"], rot)
  x = _np_layer_norm(x, p["decoder"]["final_ln"])
  ref = x @ p["lm_head"]["kernel"]
  np.testing.assert_allclose(logits[0], ref, atol=2e-4, rtol=2e-4)


def test_head_dim_rule_and_init():
  assert [head_dim_for_width(w) for w in (64, 256, 512, 1536, 2048)] == [32, 32, 64, 64, 128]
  assert StackConfig(num_layers=1, width=2048).num_heads == 16
  model, params = model_and_params("lookup-prefix-L4")
  assert np.all(np.asarray(params["block_decoder"]["layer_0"]["mlp"]["wi"]["bias"]) == 0)
  emb = np.asarray(params["token_embed"]["embedding"])
  assert abs(emb.std() - 0.02) < 0.003
  exp = np.asarray(params["expansion"]["kernel"])
  assert abs(exp.std() - 64**-0.5) < 0.02 and exp.shape == (64, 2 * 64)


# ---------------------------------------------------------------- bad input


def test_length_not_multiple_of_block_len():
  model, params = model_and_params("lookup-prefix-L4")
  with pytest.raises(ValueError, match=r"sequence length 10 is not a multiple of block_len 4"):
    model.apply({"params": params}, jnp.zeros((1, 10), jnp.int32))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      dict(embedder="conv"),
      r"unknown embedder 'conv'; valid values are \['lookup', 'projection', 'encoder'\]",
    ),
    (dict(token_decoder="medusa"), r"unknown token_decoder 'medusa'; valid values are"),
    (dict(block_len=3), r"block_width 64 is not divisible by block_len 3"),
    (dict(attention_impl="flash"), r"unknown attention_impl 'flash'"),
  ],
)
def test_bad_block_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tiny_config("block", **{**TINY_BLOCK, **kwargs})


def test_projection_embedder_allows_any_width():
  tiny_config("block", **{**TINY_BLOCK, "block_len": 3, "max_len": 63, "embedder": "projection"})


@pytest.mark.parametrize("name", ["vanilla", "lookup-prefix-L4"])
def test_token_id_outside_vocab(name):
  model, params = model_and_params(name)
  tokens = jnp.array([[1, 2, VOCAB, 3]], jnp.int32)
  with pytest.raises(
    ValueError, match=rf"token id {VOCAB} is outside the vocabulary; valid ids are 0..{VOCAB - 1}"
  ):
    token_logprobs(model, params, tokens)
  with pytest.raises(ValueError, match=r"token id -1"):
    token_logprobs(model, params, jnp.array([[1, -1]], jnp.int32))


def test_too_long_for_context():
  model, params = model_and_params("vanilla")
  with pytest.raises(
    ValueError, match=r"sequence length 65 exceeds the model's context \(max_len 64\)"
  ):
    token_logprobs(model, params, jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("name, remat", [("vanilla", "full"), ("encoder-prefix-L4", "minimal")])
def test_remat_recomputes_the_same_loss_and_gradients(name, remat):
  """Rematerialised layers: the same parameters, loss and gradients (an exact
  recomputation), and the backward pass really holds checkpointed layers."""
  model, params = model_and_params(name)
  remat_model = build_model(dataclasses.replace(make_config(name), remat=remat))
  assert jax.tree.structure(init_params(remat_model, jax.random.key(0))) == jax.tree.structure(
    params
  )
  tokens = jax.random.randint(jax.random.key(3), (2, 32), 1, VOCAB)
  mask = jnp.ones_like(tokens)

  def loss_fn(m):
    return lambda p: sequence_loss(m, p, tokens, mask)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn(model)))(params)
  remat_loss, remat_grads = jax.jit(jax.value_and_grad(loss_fn(remat_model)))(params)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn(remat_model)))(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(jax.grad(loss_fn(model)))(params))


def test_bad_remat_policy():
  with pytest.raises(ValueError, match=r"unknown remat 'everything'; valid values are"):
    tiny_config("vanilla", **TINY_VANILLA, remat="everything")
