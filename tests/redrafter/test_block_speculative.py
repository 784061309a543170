"""ReDrafter on a Block Transformer base model, drafts within the current
block (`bt_jax.redrafter.block_speculative`).

References: plain greedy Block Transformer decoding (`generate`), token for
token, for every L_B in {1, 2, 4, 8}; the training forward for the token
decoder's hidden states; the exact joint distribution of the first four
tokens from full forwards for speculative sampling.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.inference import SamplingConfig, generate, prepare_prompts
from bt_jax.models import build_model, init_params
from bt_jax.redrafter import DraftHead, DrafterConfig, init_drafter
from bt_jax.redrafter.block_speculative import (
  block_drafter_generate_fn,
  block_hidden_states,
  block_speculative_generate,
  block_speculative_generate_fn,
  check_block_drafter_fits,
  train_block_drafter,
)
from tests.utils import tiny_config

_VOCAB = 64


def _config(block_len, **kwargs):
  # init_std 0.3: peaked distributions, so greedy argmaxes are not near-ties.
  fields = dict(
    vocab_size=_VOCAB,
    block_len=block_len,
    block_layers=1,
    block_width=32,
    token_layers=1,
    token_width=32,
    prefix_len=2,
    max_len=128,
    init_std=0.3,
  )
  fields.update(kwargs)
  return tiny_config("block", **fields)


@functools.lru_cache(maxsize=4)
def _base(block_len, token_decoder="prefix"):
  model = build_model(_config(block_len, token_decoder=token_decoder))
  return model, init_params(model, jax.random.key(0))


# Ragged prompts: one token, a whole block or two, lengths that are no
# multiple of any L_B.
_PROMPTS = [
  [5, 6, 7, 8, 9, 10, 11],
  [3],
  [1, 2, 3, 4, 5],
  [20, 21, 22, 23, 24, 25, 26, 27],
  [40, 41],
  [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61],
  [33, 34, 35],
  [12, 13, 14, 15],
]


def _oracle_draft_fn(want, draft_len):
  """Drafts from the true greedy continuation `want` (a `generate` output),
  three beams sharing prefixes, corrupted per row and step."""
  reference = jnp.pad(jnp.asarray(want.tokens), ((0, 0), (0, draft_len + 1)))

  def draft_fn(hidden, g0, n_out, step):
    del hidden
    rows = jnp.arange(g0.shape[0])
    true = (
      jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, draft_len + 1))(reference, n_out)
      .at[:, 0]
      .set(g0)
    )
    depth = jnp.arange(draft_len + 1)[None, :]
    # Beam 0 (whose tokens fill the first packed slots) is wrong from depth
    # 1, so a chosen later beam's K/V must be moved into place.
    beam0 = jnp.where(depth >= 1, (true * 7 + 5) % _VOCAB, true)
    beam1 = jnp.where(depth == 1 + ((rows + step) % draft_len)[:, None], (true + 1) % _VOCAB, true)
    # Even rows: all correct; odd rows: wrong from depth 1 (rows 1, 5) or 2.
    beam2 = jnp.where(
      (rows % 2 == 0)[:, None],
      true,
      jnp.where(depth >= 1 + (rows // 2 % 2)[:, None], (true + 2) % _VOCAB, true),
    )
    return jnp.stack([beam0, beam1, beam2], axis=1)

  return draft_fn


def test_hidden_states_are_what_the_head_reads():
  """`block_hidden_states` at position t, through the output layer, gives
  the training forward's logits of token t + 1 (block 0 excluded)."""
  block_len = 4
  model, params = _base(block_len)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, _VOCAB, size=(2, 16)), jnp.int32)
  logits = jax.jit(model.apply)({"params": params}, tokens)  # [2, 3, L, V]
  hidden = jax.jit(functools.partial(block_hidden_states, model))(params, tokens)
  assert hidden.shape == (2, 16, 32)
  via_hidden = jnp.dot(hidden, params["lm_head"]["kernel"])[:, block_len - 1 : -1]
  np.testing.assert_allclose(
    np.asarray(via_hidden).reshape(logits.shape), np.asarray(logits), rtol=1e-5, atol=1e-5
  )
  assert not np.asarray(hidden[:, : block_len - 1]).any() and not np.asarray(hidden[:, -1]).any()


@pytest.mark.parametrize(
  "block_len,token_decoder",
  [
    (1, "prefix"),
    (2, "prefix"),
    (4, "prefix"),
    (8, "prefix"),
    (4, "summation"),
    (4, "cross_attention"),
  ],
  ids=["L1", "L2", "L4", "L8", "L4-summation", "L4-cross_attention"],
)
def test_oracle_drafts_give_greedy_tokens_for_every_block_len(block_len, token_decoder):
  """Drafts built from the true greedy continuation with row- and step-
  dependent corruptions, beams sharing prefixes: rows accept different
  lengths (and from different beams) and finish blocks at different steps;
  drafts past the block's end are cut. The tokens equal plain greedy
  Block Transformer decoding, with ragged prompts, with and without EOS,
  for every L_B in {1, 2, 4, 8} and the three token decoders. (Leaving out
  the K/V move of the chosen beam fails the L_B = 4 and 8 cases, where
  steps continue in a block after a beam other than the first was chosen.)"""
  model, params = _base(block_len, token_decoder)
  max_new, draft_len, num_beams = 18, 3, 3
  want = generate(model, params, _PROMPTS, max_new_tokens=max_new)
  fn = block_speculative_generate_fn(
    model,
    _oracle_draft_fn(want, draft_len),
    num_beams=num_beams,
    draft_len=draft_len,
    max_new_tokens=max_new,
    cross_blocks=False,  # drafts within the block (step one)
  )
  batch = prepare_prompts(_PROMPTS, model.config, max_new)
  args = (params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad))
  got = fn(*args, jnp.int32(-1))
  assert got.crossings is None
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  row_steps, accepted = np.asarray(got.row_steps), np.asarray(got.accepted)
  assert (row_steps + accepted >= max_new).all(), (row_steps, accepted)
  if block_len == 1:
    assert not accepted.any()  # nothing left to draft in a block of one
  else:
    # Even rows accept every draft the block leaves: one step per block when
    # C >= L_B - 1; odd rows accept less.
    blocks = -(-max_new // block_len)
    want_even = blocks if draft_len >= block_len - 1 else None
    if want_even is not None:
      assert (row_steps[0::2] == want_even).all(), row_steps
    assert (accepted > 0).all() and (row_steps[1::2] >= row_steps[0::2]).all(), (
      row_steps,
      accepted,
    )
    assert row_steps[1] > row_steps[0] and row_steps[5] > row_steps[4], row_steps
  eos = int(np.asarray(want.tokens)[2, 5])
  want_eos = generate(model, params, _PROMPTS, max_new_tokens=max_new, eos_id=eos)
  got_eos = fn(*args, jnp.int32(eos))
  np.testing.assert_array_equal(np.asarray(got_eos.tokens), np.asarray(want_eos.tokens))
  np.testing.assert_array_equal(np.asarray(got_eos.lengths), np.asarray(want_eos.lengths))
  assert np.asarray(want_eos.lengths).min() < max_new  # some row stopped at EOS


@pytest.mark.parametrize(
  "block_len,draft_len,token_decoder",
  [
    (1, 3, "prefix"),
    (2, 3, "prefix"),
    (4, 5, "prefix"),
    (8, 9, "prefix"),
    (8, 3, "prefix"),
    (4, 5, "summation"),
    (4, 5, "cross_attention"),
  ],
  ids=["L1-C3", "L2-C3", "L4-C5", "L8-C9", "L8-C3", "L4-C5-summation", "L4-C5-cross_attention"],
)
def test_drafts_crossing_the_block_boundary_give_greedy_tokens(block_len, draft_len, token_decoder):
  """cross_blocks: beams that reach the block's end propose candidate
  blocks, run through one block-decoder step together, and their drafts
  past the boundary are verified on each candidate's next-block first pass.
  The oracle drafts (corrupted per row and step: rows accept different
  lengths, some steps cross and some stay in the block, beams other than
  the first are chosen) give the tokens of plain greedy decoding, with and
  without EOS. Crossings happen (counted); at L_B >= 4 the all-correct
  rows emit more than L_B tokens per step, which drafts within the block
  cannot; L8-C3 mixes rows that cross with rows that complete the block in
  it (C <= L_B - 1 - j). (Leaving out the chosen candidate's block-decoder
  K/V move fails L1-C3 and L4-C5; taking candidate 0's instead of the
  chosen one's fails L2-C3, L4-C5 and L8-C9.)"""
  model, params = _base(block_len, token_decoder)
  max_new, num_beams = 18, 3
  want = generate(model, params, _PROMPTS, max_new_tokens=max_new)
  fn = block_speculative_generate_fn(
    model,
    _oracle_draft_fn(want, draft_len),
    num_beams=num_beams,
    draft_len=draft_len,
    max_new_tokens=max_new,
  )
  batch = prepare_prompts(_PROMPTS, model.config, max_new)
  args = (params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad))
  got = fn(*args, jnp.int32(-1))
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  row_steps, accepted = np.asarray(got.row_steps), np.asarray(got.accepted)
  crossings = np.asarray(got.crossings)
  assert (row_steps + accepted >= max_new).all(), (row_steps, accepted)
  if draft_len >= block_len:  # every step's beams reach the block's end
    assert (crossings > 0).all(), crossings
  else:  # L8-C3: even rows complete blocks in them (j = 0, 4), odd rows cross
    assert not crossings[0::2].any() and (crossings[1::2] > 0).all(), crossings
  if block_len == 1:
    assert not accepted.any()  # the next g_0 would leave the next block
  if block_len >= 4 and draft_len > block_len:
    # Even rows: all drafts right, more tokens per step than a block holds.
    assert (max_new / row_steps[0::2] > block_len).all(), row_steps
  if block_len >= 4:  # odd rows accept less
    assert row_steps[1] > row_steps[0] and row_steps[5] > row_steps[4], row_steps
  eos = int(np.asarray(want.tokens)[2, 5])
  want_eos = generate(model, params, _PROMPTS, max_new_tokens=max_new, eos_id=eos)
  got_eos = fn(*args, jnp.int32(eos))
  np.testing.assert_array_equal(np.asarray(got_eos.tokens), np.asarray(want_eos.tokens))
  np.testing.assert_array_equal(np.asarray(got_eos.lengths), np.asarray(want_eos.lengths))


def test_crossing_drafts_with_the_attention_kernel():
  """attention_impl "pallas_interpret" (the split-KV decode kernel, here
  interpreted on CPU): the candidates' block-decoder step reads the
  committed slots through the kernel's window and its own scratch slot
  through the mask; L_B = 4, C = 5 gives the tokens of plain greedy
  decoding with the default attention."""
  block_len, draft_len, max_new = 4, 5, 18
  model, params = _base(block_len)
  kernel_model = build_model(_config(block_len, attention_impl="pallas_interpret"))
  want = generate(model, params, _PROMPTS, max_new_tokens=max_new)
  fn = block_speculative_generate_fn(
    kernel_model,
    _oracle_draft_fn(want, draft_len),
    num_beams=3,
    draft_len=draft_len,
    max_new_tokens=max_new,
  )
  batch = prepare_prompts(_PROMPTS, model.config, max_new)
  got = fn(params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jnp.int32(-1))
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  assert (np.asarray(got.crossings) > 0).all()


@functools.lru_cache(maxsize=2)
def _distilled(block_len):
  """A drafter (the library's default head) trained briefly on the base
  model's own greedy continuations of random prompts."""
  model, params = _base(block_len)
  rng = np.random.default_rng(0)
  prompt_len = 8
  prompts = [rng.integers(1, _VOCAB, size=prompt_len).tolist() for _ in range(48)]
  continuation = np.asarray(generate(model, params, prompts, max_new_tokens=24).tokens)
  tokens = np.concatenate([np.array(prompts), continuation], axis=1)
  target_mask = np.zeros(tokens.shape, bool)
  target_mask[:, prompt_len:] = True
  drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=3))
  dparams, losses = train_block_drafter(
    model,
    params,
    drafter,
    init_drafter(drafter, jax.random.key(1)),
    tokens,
    steps=120,
    target_mask=target_mask,
  )
  return drafter, dparams, losses


@pytest.mark.parametrize("block_len", [4, 8])
def test_a_distilled_drafter_is_accepted_and_greedy_stays_exact(block_len):
  """A drafter distilled from the base model's greedy outputs: over many
  ragged prompts, more than one draft accepted per step on average (the
  untrained drafter accepts far fewer), the tokens equal to plain greedy
  decoding, within the block and across its boundary."""
  model, params = _base(block_len)
  drafter, dparams, losses = _distilled(block_len)
  assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, _VOCAB, size=rng.integers(1, 12)).tolist() for _ in range(8)]
  want = generate(model, params, prompts, max_new_tokens=20)
  got = block_speculative_generate(
    model, params, drafter, dparams, prompts, max_new_tokens=20, beam_width=3, cross_blocks=False
  )
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  per_step = np.asarray(got.accepted).sum() / np.asarray(got.row_steps).sum()
  assert per_step > 1.0, per_step
  # Drafts crossing the block boundary (the default): the same tokens, and
  # some steps' accepted paths cross.
  crossing = block_speculative_generate(
    model, params, drafter, dparams, prompts, max_new_tokens=20, beam_width=3
  )
  np.testing.assert_array_equal(np.asarray(crossing.tokens), np.asarray(want.tokens))
  assert np.asarray(crossing.crossings).sum() > 0
  untrained = block_speculative_generate(
    model,
    params,
    drafter,
    init_drafter(drafter, jax.random.key(9)),
    prompts,
    max_new_tokens=20,
    beam_width=3,
    cross_blocks=False,
  )
  np.testing.assert_array_equal(np.asarray(untrained.tokens), np.asarray(want.tokens))
  assert (
    np.asarray(untrained.accepted).sum() / np.asarray(untrained.row_steps).sum() < 0.5 * per_step
  )


def test_a_drafter_for_another_base_is_an_error_naming_both_sides():
  model, params = _base(4)
  config = model.config
  for other, message in [
    (
      _config(4, token_width=64),
      "made for vocab 64 and width 64; this block base model has "
      "vocab 64 and token decoder width 32",
    ),
    (
      _config(4, vocab_size=80),
      "made for vocab 80 and width 32; this block base model has "
      "vocab 64 and token decoder width 32",
    ),
    (
      tiny_config("vanilla", vocab_size=_VOCAB, width=48, head_dim=16),
      "made for vocab 64 and width 48; this block base model has vocab 64 and token decoder "
      "width 32",
    ),
  ]:
    drafter = DraftHead(DrafterConfig.for_base(other, draft_len=2))
    with pytest.raises(ValueError, match=message):
      block_speculative_generate(model, params, drafter, None, [[1, 2]], max_new_tokens=2)
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=2))
  assert drafter.config.hidden_dim == drafter.config.embed_dim == 32  # the token decoder's
  with pytest.raises(
    ValueError, match="trained for a vanilla base model; this base model is block"
  ):
    block_speculative_generate(
      model,
      params,
      drafter,
      None,
      [[1, 2]],
      max_new_tokens=2,
      recorded_base={"kind": "vanilla", "width": 32, "vocab_size": _VOCAB},
    )
  with pytest.raises(ValueError, match="drafts for a block base model; this base model is vanilla"):
    check_block_drafter_fits(drafter, tiny_config("vanilla", vocab_size=_VOCAB, width=32))
  with pytest.raises(TypeError, match="needs a BlockTransformer base model; got VanillaLM"):
    block_speculative_generate(
      build_model(tiny_config("vanilla", vocab_size=_VOCAB, width=32)),
      None,
      drafter,
      None,
      [[1, 2]],
      max_new_tokens=2,
    )
  with pytest.raises(ValueError, match="beam_width 65 exceeds the vocabulary \\(64\\)"):
    block_speculative_generate(
      model, params, drafter, None, [[1, 2]], max_new_tokens=2, beam_width=65
    )
  with pytest.raises(ValueError, match="draft_top_k cuts the drafter's logits"):
    block_speculative_generate(
      model,
      params,
      drafter,
      None,
      [[1, 2]],
      max_new_tokens=2,
      sampling=SamplingConfig(temperature=1.0),
      draft_top_k=2,
    )
  check_block_drafter_fits(drafter, config, {"kind": "block", "width": 32, "vocab_size": _VOCAB})


# Speculative sampling: the joint distribution of the first four generated
# tokens over a 4-token vocabulary, against the exact one from full forwards.
_JOINT_ROWS = 20000
_SAMPLE_PROMPT = [1, 2, 3, 1]  # whole blocks for L_B 2 and 4


@functools.lru_cache(maxsize=3)
def _four_token_setup(block_len, draft_len=2, shift=0):
  """(model, params, drafter, drafter params, the exact joint [4]*4 of
  generated tokens shift .. shift + 3, the first `shift` marginalised)."""
  config = tiny_config(
    "block",
    vocab_size=4,
    block_len=block_len,
    block_layers=1,
    block_width=32,
    token_layers=1,
    token_width=32,
    prefix_len=2,
    max_len=32,
    init_std=1.0,
  )
  model = build_model(config)
  params = init_params(model, jax.random.key(3))
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=draft_len))
  dparams = init_drafter(drafter, jax.random.key(4))
  length = 4 + shift
  sequences = np.array(list(itertools.product(range(4), repeat=length)), np.int32)
  whole = -(-length // block_len) * block_len  # later tokens do not change these logits
  full = np.concatenate(
    [
      np.tile(_SAMPLE_PROMPT, (len(sequences), 1)),
      np.pad(sequences, ((0, 0), (0, whole - length))),
    ],
    axis=1,
  )
  logits = model.apply({"params": params}, jnp.asarray(full))  # blocks 1.. of 8 tokens
  logits = np.asarray(logits).reshape(len(sequences), -1, 4)[:, len(_SAMPLE_PROMPT) - block_len :]
  logits = logits[:, :length]
  logits = logits.astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  exact = np.prod(np.take_along_axis(probs, sequences[:, :, None], axis=2)[..., 0], axis=1)
  exact = exact.reshape((4,) * length).sum(axis=tuple(range(shift)))
  return model, params, drafter, dparams, exact


def _four_token_tv(block_len, beam_width, draft_len=2, cross_blocks=False, shift=0):
  model, params, drafter, dparams, exact = _four_token_setup(block_len, draft_len, shift)
  out = block_speculative_generate(
    model,
    params,
    drafter,
    dparams,
    [_SAMPLE_PROMPT] * _JOINT_ROWS,
    max_new_tokens=4 + shift,
    sampling=SamplingConfig(temperature=1.0),
    beam_width=beam_width,
    seed=5,
    cross_blocks=cross_blocks,
  )
  tokens = np.asarray(out.tokens)[:, shift:]
  empirical = np.zeros((4,) * 4)
  np.add.at(empirical, tuple(tokens.T), 1.0 / _JOINT_ROWS)
  return 0.5 * np.abs(empirical - exact).sum(), out


def _four_token_bound(block_len, draft_len=2, shift=0):
  """The total variation exact sampling of _JOINT_ROWS sequences stays
  under: the largest of 20 multinomial draws from the exact joint, + 25%."""
  exact = _four_token_setup(block_len, draft_len, shift)[-1].ravel()
  rng = np.random.default_rng(0)
  draws = rng.multinomial(_JOINT_ROWS, exact, size=20) / _JOINT_ROWS
  return 1.25 * max(0.5 * np.abs(d - exact).sum() for d in draws)


@pytest.mark.parametrize("block_len,beam_width", [(4, 2), (2, 2)], ids=["L4", "L2"])
def test_speculative_sampling_has_the_exact_joint_distribution(block_len, beam_width, monkeypatch):
  """20000 rows, vocabulary 4, two sampled drafts of two tokens per step.
  L_B = 4: the first four tokens are one block (the first pass's token,
  both draft positions, the bonus token); L_B = 2: drafts cut at the
  block's end and the block decoder's next block. The joint of the 256
  sequences against the exact one, under a bound from exact sampling's own
  noise. Power (L_B = 4): drawing the correction from p instead of the
  residual max(p - q, 0) exceeds the bound."""
  bound = _four_token_bound(block_len)
  exact = _four_token_setup(block_len)[-1]
  assert np.isclose(exact.sum(), 1.0)
  tv, out = _four_token_tv(block_len, beam_width)
  accepted, row_steps = np.asarray(out.accepted), np.asarray(out.row_steps)
  assert tv < bound, (tv, bound)
  if block_len == 4:  # one block: accepting two drafts takes one step
    assert np.mean(accepted >= 2) > 0.05, np.mean(accepted >= 2)  # the second draft position
  else:  # one draft fits in a block of two: at most one a step
    assert (accepted <= row_steps).all() and accepted.max() == 2, accepted.max()
    assert np.mean(accepted >= 1) > 0.05, np.mean(accepted >= 1)
  if block_len != 4:
    return
  from bt_jax.redrafter import speculative  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
  block_drafter_generate_fn.cache_clear()  # retrace with the wrong rule
  try:
    wrong = _four_token_tv(block_len, beam_width)[0]
  finally:
    block_drafter_generate_fn.cache_clear()
  assert wrong > bound, (wrong, bound)


@pytest.mark.parametrize("draft_len,shift", [(2, 0), (3, 1)], ids=["C2", "C3"])
def test_speculative_sampling_across_the_block_boundary_is_exact(draft_len, shift):
  """As above with cross_blocks at L_B = 2 (two sampled drafts): the drafts
  past the block's end are verified on the candidate block's next-block
  first pass, the acceptance runs over the whole path. C = 2: from g_0 at
  index 0 both drafts can be accepted (d_2 the next block's first token);
  C = 3: at most L_B - 1 = 1 past-boundary draft counts, so the third is
  cut and the next token drawn from p after the second; there the joint
  of generated tokens 1 .. 4 (token 0 marginalised) is checked, which the
  cut reaches (not trying the third draft against the limit passes the
  first four tokens but fails this). The joint against the exact one,
  under the same bound; steps whose accepted path crossed the boundary are
  common."""
  block_len = 2
  bound = _four_token_bound(block_len, draft_len, shift)
  tv, out = _four_token_tv(block_len, 2, draft_len, cross_blocks=True, shift=shift)
  assert tv < bound, (tv, bound)
  crossings = np.asarray(out.crossings)
  assert np.mean(crossings > 0) > 0.2, np.mean(crossings > 0)
  # Three tokens in one step (g_0 and two drafts) need a crossing at L_B = 2.
  assert np.mean(np.asarray(out.accepted) >= 2) > 0.05


def test_accept_sampled_limit_cuts_the_beams():
  """`speculative._accept_sampled` with a per-row limit (what crossing rows
  use): at most limit drafts are accepted, and after limit accepted drafts
  the next token is drawn from the target at that depth (not tried against
  the next draft). Fixed tables: the target p_d and the drafter q_d per
  depth, the same for every prefix; 20000 rows, drafts drawn from q."""
  from bt_jax.redrafter import speculative  # pylint: disable=import-outside-toplevel

  rows, num_beams, draft_len, vocab = 20000, 2, 2, 4
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(vocab), size=draft_len + 1)  # [C+1, V]
  q = rng.dirichlet(np.ones(vocab), size=draft_len)  # [C, V]
  drafts = np.stack(
    [rng.choice(vocab, size=(rows, num_beams), p=q[d]) for d in range(draft_len)], axis=-1
  )
  beams = jnp.asarray(np.concatenate([np.zeros((rows, num_beams, 1)), drafts], -1), jnp.int32)
  logits = jnp.log(jnp.asarray(np.tile(p, (num_beams, 1)), jnp.float32))  # identity unpacker
  unpacker = jnp.arange(num_beams * (draft_len + 1)).reshape(num_beams, draft_len + 1)
  q_logprobs = jnp.log(jnp.asarray(np.broadcast_to(q, (num_beams, draft_len, vocab)), jnp.float32))
  limit = jnp.asarray(np.arange(rows) % 2, jnp.int32)  # 0 and 1
  _, accepted, next_token = jax.jit(speculative._accept_sampled, static_argnums=4)(
    jnp.broadcast_to(logits, (rows,) + logits.shape),
    jnp.broadcast_to(unpacker, (rows,) + unpacker.shape),
    beams,
    jnp.broadcast_to(q_logprobs, (rows,) + q_logprobs.shape),
    SamplingConfig(temperature=1.0),
    jax.random.key(0),
    limit,
  )
  accepted, next_token = np.asarray(accepted), np.asarray(next_token)
  assert (accepted <= np.asarray(limit)).all()
  # limit 0: nothing tried, the next token from p_0.
  freq = np.bincount(next_token[0::2], minlength=vocab) / (rows // 2)
  assert 0.5 * np.abs(freq - p[0]).sum() < 0.02, (freq, p[0])
  # limit 1: after an accepted draft, the next token comes from p_1.
  cut = next_token[1::2][accepted[1::2] == 1]
  assert len(cut) > 2000
  freq = np.bincount(cut, minlength=vocab) / len(cut)
  assert 0.5 * np.abs(freq - p[1]).sum() < 0.03, (freq, p[1])
