"""ReDrafter: tree packing, beam search, teacher forcing, speculative decoding.

References: the ReDrafter paper's worked example and brute force for the packing, a
NumPy beam search for the drafter's, explicit per-position cross-entropies
for the loss, and plain greedy `generate` for speculative decoding (token for
token).
"""

from __future__ import annotations

import functools
import json
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.inference import SamplingConfig, generate
from bt_jax.models import build_model, init_params
from bt_jax.redrafter import (
  DraftHead,
  DrafterConfig,
  beam_search,
  distillation_batches,
  init_drafter,
  pack_beams,
  speculative_generate,
  speculative_generate_fn,
  teacher_forcing_loss,
  train_drafter,
)
from tests.utils import tiny_config

# init_std 0.3: peaked distributions, so greedy argmaxes are not near-ties.
BASE = tiny_config(
  "vanilla", num_layers=2, width=32, head_dim=16, vocab_size=128, max_len=128, init_std=0.3
)
# The paper's draft head (its own 2H x V head, ResBlocks at 2H), for the tests
# whose figures were measured with it.
PAPER_HEAD = dict(lm_head="own", exit_ratio=1.0)
# Ragged: a one-token prompt, lengths 7, 5 and 8.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [1, 2, 3, 4, 5], [20, 21, 22, 23, 24, 25, 26, 27]]


@functools.lru_cache(maxsize=1)
def _base():
  model = build_model(BASE)
  return model, init_params(model, jax.random.key(0))


def test_pack_beams_spec_example():
  beams = jnp.array([[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]])
  tree = pack_beams(beams)
  np.testing.assert_array_equal(tree.prefix_tree, [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]])
  np.testing.assert_array_equal(tree.unpacker, [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]])
  assert int(tree.num_valid) == 7  # instead of 12
  np.testing.assert_array_equal(np.asarray(tree.tokens)[np.asarray(tree.unpacker)], beams)
  np.testing.assert_array_equal(tree.depth[:7], [0, 1, 2, 3, 2, 3, 3])


@pytest.mark.parametrize("seed", range(4))
def test_pack_beams_against_brute_force(seed):
  """Random beams over 3 symbols (many shared prefixes): one packed token per
  distinct prefix, each seeing exactly the packed tokens that are its prefixes."""
  rng = np.random.default_rng(seed)
  beams = rng.integers(0, 3, size=(6, 4))
  beams[:, 0] = 7  # g0 is shared by construction
  tree = jax.jit(pack_beams)(jnp.asarray(beams))
  tokens, unpacker = np.asarray(tree.tokens), np.asarray(tree.unpacker)
  np.testing.assert_array_equal(tokens[unpacker], beams)
  prefixes = {tuple(b[: d + 1]) for b in beams for d in range(4)}
  assert int(tree.num_valid) == len(prefixes)
  # The prefix each packed token stands for, from the unpacker.
  stands_for = {}
  for i, d in itertools.product(range(6), range(4)):
    stands_for.setdefault(int(unpacker[i, d]), tuple(beams[i, : d + 1]))
    assert stands_for[int(unpacker[i, d])] == tuple(beams[i, : d + 1])
  mask = np.asarray(tree.mask)
  for p in range(24):
    for q in range(24):
      want = (
        p in stands_for and q in stands_for and stands_for[p][: len(stands_for[q])] == stands_for[q]
      )
      assert mask[p, q] == want, (p, q)
  # Topological: a token's ancestors come before it.
  assert all(q <= p for p, q in zip(*np.nonzero(mask)))


def _numpy_beam_search(drafter, params, hidden, g0, table, beam_width, draft_len):
  """Beam search with explicit loops over beams and candidates (float64 scores)."""
  step = jax.jit(functools.partial(drafter.apply, method=drafter.step))
  logits_fn = jax.jit(functools.partial(drafter.apply, method=drafter.logits))
  beams = [((int(g0),), 0.0, np.zeros(drafter.config.hidden_dim, np.float32))]
  for _ in range(draft_len):
    candidates = []
    for tokens, score, state in beams:
      state = np.asarray(step({"params": params}, state[None], table[tokens[-1]][None]))[0]
      logits = np.asarray(logits_fn({"params": params}, hidden[None], state[None]))[0]
      log_q = (
        logits - np.log(np.sum(np.exp(logits.astype(np.float64) - logits.max()))) - logits.max()
      )
      candidates += [(tokens + (v,), score + float(log_q[v]), state) for v in range(len(log_q))]
    candidates.sort(key=lambda c: -c[1])
    beams = candidates[:beam_width]
  return np.array([b[0] for b in beams]), np.array([b[1] for b in beams])


def test_beam_search_matches_a_numpy_reference():
  config = DrafterConfig(vocab_size=11, hidden_dim=8, embed_dim=6, draft_len=3)
  drafter = DraftHead(config)
  params = init_drafter(drafter, jax.random.key(3))
  table = np.asarray(jax.random.normal(jax.random.key(4), (11, 6)))
  hidden = np.asarray(jax.random.normal(jax.random.key(5), (2, 8)))
  g0 = np.array([4, 9])
  beams, scores = jax.jit(functools.partial(beam_search, drafter, beam_width=4, draft_len=3))(
    params, jnp.asarray(hidden), jnp.asarray(g0), jnp.asarray(table)
  )
  for row in range(2):
    want_beams, want_scores = _numpy_beam_search(drafter, params, hidden[row], g0[row], table, 4, 3)
    np.testing.assert_array_equal(np.asarray(beams)[row], want_beams)
    np.testing.assert_allclose(np.asarray(scores)[row], want_scores, rtol=1e-5, atol=1e-5)
  # Only beam 0 starts alive: one step gives the 4 most likely, distinct tokens.
  one, _ = beam_search(
    drafter,
    params,
    jnp.asarray(hidden),
    jnp.asarray(g0),
    jnp.asarray(table),
    beam_width=4,
    draft_len=1,
  )
  state = drafter.apply(
    {"params": params}, jnp.zeros((2, 8)), jnp.asarray(table)[g0], method=drafter.step
  )
  logits = drafter.apply({"params": params}, jnp.asarray(hidden), state, method=drafter.logits)
  np.testing.assert_array_equal(
    np.asarray(one)[:, :, 1], np.argsort(-np.asarray(logits), axis=-1)[:, :4]
  )


def test_teacher_forcing_loss_against_explicit_positions():
  model, params = _base()
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=3, **PAPER_HEAD))
  dparams = init_drafter(drafter, jax.random.key(1))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 128, size=(2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, 6:] = 0
  hidden = model.apply({"params": params}, jnp.asarray(tokens), method=model.hidden_states)
  table = params["token_embed"]["embedding"]
  loss, aux = teacher_forcing_loss(
    drafter, dparams, hidden, table, jnp.asarray(tokens), jnp.asarray(mask)
  )
  # Explicit: at position t, step i feeds tokens t+1 .. t+1+i and predicts t+2+i.
  sums, counts = np.zeros(3), np.zeros(3)
  for b, t in itertools.product(range(2), range(9)):
    for i in range(3):
      target = t + 2 + i
      if target >= 9 or not mask[b, target] or not mask[b, t]:
        continue
      inputs = jnp.take(table, jnp.asarray(tokens[b, t + 1 : t + 2 + i]), axis=0)[None]
      logits = np.asarray(drafter.apply({"params": dparams}, hidden[b, t][None], inputs))[0, -1]
      logits = logits.astype(np.float64)
      sums[i] += (
        np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[tokens[b, target]]
      )
      counts[i] += 1
  np.testing.assert_allclose(np.asarray(aux["count_i"]), counts)
  np.testing.assert_allclose(np.asarray(aux["loss_i"]), sums / counts, rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.sum(sums / counts), rtol=1e-5)


def test_speculative_equals_greedy_with_an_untrained_drafter():
  """Nothing accepted, still exact: one token per step, EOS per row."""
  model, params = _base()
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=3))
  dparams = init_drafter(drafter, jax.random.key(1))
  want = generate(model, params, PROMPTS, max_new_tokens=12)
  got = speculative_generate(
    model, params, drafter, dparams, PROMPTS, max_new_tokens=12, beam_width=3
  )
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  eos = int(np.asarray(want.tokens)[2, 4])
  want = generate(model, params, PROMPTS, max_new_tokens=12, eos_id=eos)
  got = speculative_generate(
    model, params, drafter, dparams, PROMPTS, max_new_tokens=12, beam_width=3, eos_id=eos
  )
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))


@pytest.mark.parametrize("attention_impl", ["xla", "pallas_interpret"])
def test_speculative_with_oracle_drafts_accepts_and_stays_exact(attention_impl):
  """Drafts built from the true greedy continuation, with row- and step-
  dependent corruptions and beams that share prefixes: rows accept different
  lengths each step (and from different beams), the K/V of the chosen beam
  must land in the right cache slots, and the output must stay exact. With
  "pallas_interpret" the packed verify runs the split-KV decode kernel
  (interpreter) over the context window merged with the tree part."""
  model, params = _base()
  max_new, draft_len, num_beams = 20, 4, 4
  want = generate(model, params, PROMPTS, max_new_tokens=max_new)
  if attention_impl != "xla":
    import dataclasses  # pylint: disable=import-outside-toplevel

    model = build_model(dataclasses.replace(BASE, attention_impl=attention_impl))
  reference = jnp.pad(jnp.asarray(want.tokens), ((0, 0), (0, draft_len + 1)))

  def draft_fn(hidden, g0, n_out, step):
    del hidden
    rows = jnp.arange(g0.shape[0])
    window = jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, draft_len + 1))(
      reference, n_out
    )
    true = window.at[:, 0].set(g0)
    wrong_at = 1 + (rows + step) % draft_len  # beam 0 breaks here
    depth = jnp.arange(draft_len + 1)[None, :]
    beam0 = jnp.where(depth == wrong_at[:, None], (true + 1) % BASE.vocab_size, true)
    beam1 = jnp.where(
      (rows % 2 == 0)[:, None],
      true,  # even rows: all correct
      jnp.where(depth >= 2, (true + 2) % BASE.vocab_size, true),
    )
    beam2 = jnp.where(depth >= 3, (true + 3) % BASE.vocab_size, beam0)  # shares beam0's start
    beam3 = jnp.where(depth >= 1, (true * 7 + 5) % BASE.vocab_size, true)
    return jnp.stack([beam0, beam1, beam2, beam3], axis=1)

  fn = speculative_generate_fn(
    model, draft_fn, num_beams=num_beams, draft_len=draft_len, max_new_tokens=max_new
  )
  from bt_jax.inference import prepare_prompts  # pylint: disable=import-outside-toplevel

  batch = prepare_prompts(PROMPTS, BASE, max_new)
  args = (params, jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jnp.int32(-1))
  got = fn(*args)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  row_steps, accepted = np.asarray(got.row_steps), np.asarray(got.accepted)
  # Even rows accept every draft: 5 tokens a step, 4 steps for 20 tokens.
  assert row_steps[0] == row_steps[2] == 4, row_steps
  assert (row_steps[1::2] > 4).all() and (accepted[1::2] > 0).all(), (row_steps, accepted)
  assert int(got.steps) == row_steps.max()
  if attention_impl != "xla":  # the packed tree's 20 queries went to the kernel
    from tests.kernel_calls import kernel_calls  # pylint: disable=import-outside-toplevel

    # decode_attention's operands: starts, ends, q rows [batch, kv_heads,
    # rows (queries per kv head, padded to a power of two), head_dim], k, v.
    rows = [shapes[2][2] for name, shapes in kernel_calls(fn, *args) if name == "decode_attention"]
    assert any(r >= num_beams * (draft_len + 1) for r in rows), rows


def test_distilled_drafter_gets_accepted():
  """A drafter trained briefly on the base model's own greedy continuations
  (distillation): more than one token per base-model forward, same output."""
  model, params = _base()
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=3, **PAPER_HEAD))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 128, size=rng.integers(1, 8)).tolist() for _ in range(48)]
  batches = distillation_batches(model, params, prompts, continuation_len=20, batch_size=16)
  dparams, history = train_drafter(
    model, params, drafter, batches, steps=200, learning_rate=3e-3, progress=False
  )
  assert history[-1]["loss"] < 0.5 * history[0]["loss"], (history[0], history[-1])
  test_prompts = [rng.integers(1, 128, size=rng.integers(1, 8)).tolist() for _ in range(6)]
  want = generate(model, params, test_prompts, max_new_tokens=20)
  got = speculative_generate(
    model, params, drafter, dparams, test_prompts, max_new_tokens=20, beam_width=4
  )
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  tokens_per_step = np.asarray(got.lengths).sum() / np.asarray(got.row_steps).sum()
  assert tokens_per_step > 1.5, tokens_per_step


def test_errors_name_the_bad_value():
  model, params = _base()
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=2))
  dparams = init_drafter(drafter, jax.random.key(0))
  with pytest.raises(ValueError, match="beam_width must be a positive integer; got 0"):
    speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4, beam_width=0)
  with pytest.raises(ValueError, match="beam_width 200 exceeds the vocabulary"):
    speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4, beam_width=200)
  with pytest.raises(ValueError, match="DrafterConfig.draft_len must be positive; got 0"):
    DrafterConfig.for_base(BASE, draft_len=0)
  with pytest.raises(ValueError, match="beam_width must be a positive integer; got 0"):
    speculative_generate(
      model,
      params,
      drafter,
      dparams,
      PROMPTS,
      max_new_tokens=4,
      beam_width=0,
      sampling=SamplingConfig(temperature=1.0),
    )
  with pytest.raises(TypeError, match="needs a VanillaLM base model"):
    speculative_generate_fn(object(), None, num_beams=2, draft_len=2, max_new_tokens=2)
  with pytest.raises(TypeError, match="got BlockTransformer .a BlockTransformer takes .*block_spec"):
    speculative_generate_fn(
      build_model(tiny_config("block")), None, num_beams=2, draft_len=2, max_new_tokens=2
    )
  fn = speculative_generate_fn(
    model,
    lambda h, g0, n, s: jnp.zeros((g0.shape[0], 2, 3)),
    num_beams=3,
    draft_len=2,
    max_new_tokens=2,
  )
  with pytest.raises(
    ValueError,
    match=r"draft_fn returned beams of shape \(4, 2, 3\); "
    r"expected \[batch, 3, 3\]",
  ):
    fn(params, jnp.ones((4, 2), jnp.int32), jnp.zeros((4,), jnp.int32), jnp.int32(-1))


def test_benchmark_smoke(tmp_path):
  """experiments.redrafter_bench end to end on a random-weight model: the
  drafter trains, both decoders are timed, the tokens agree, JSON is written."""
  from bt_jax import cli  # pylint: disable=import-outside-toplevel
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel

  out = tmp_path / "redrafter.json"
  report = cli.call(
    redrafter_bench,
    [
      "--train_steps",
      "4",
      "--distill_prompts",
      "8",
      "--train_batch",
      "4",
      "--batch_sizes",
      "2",
      "--max_new_tokens",
      "8",
      "--prompt_len",
      "8",
      "--repeats",
      "1",
      "--draft_len",
      "2",
      "--beam_widths",
      "2",
      "--split_repeats",
      "1",
      "--sample_beams",
      "2",
      "--out",
      str(out),
    ],
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  (record,) = report["results"]
  assert record["same_tokens_as_greedy"] and record["batch_size"] == 2
  assert 1.0 <= record["tokens_per_step"] <= 3.0
  assert record["beam_width"] == record["draft_len"] == 2
  assert record["speedup"] == pytest.approx(
    record["greedy_ms"]["median"] / record["speculative_ms"]["median"]
  )
  assert report["meta"]["weights"] == "random" and report["meta"]["complete"]
  (sampled,) = report["sampling"]
  assert sampled["drafts"] == 2 and sampled["temperature"] == 1.0
  assert 1.0 <= sampled["tokens_per_step"] <= 3.0
  assert sampled["speedup"] == pytest.approx(
    sampled["speculative_tokens_per_s"] / sampled["sampling_tokens_per_s"]
  )


def test_a_drafter_for_another_model_is_an_error():
  from bt_jax.redrafter.checkpoint import check_drafter_fits  # pylint: disable=import-outside-toplevel

  drafter = DraftHead(DrafterConfig(vocab_size=100, hidden_dim=32, embed_dim=32))
  with pytest.raises(
    ValueError, match="made for vocab 100 and width 32; this base model has vocab 128 and width 32"
  ):
    check_drafter_fits(drafter, BASE)
  check_drafter_fits(DraftHead(DrafterConfig.for_base(BASE)), BASE)


SAMPLINGS = {
  "t1": SamplingConfig(temperature=1.0),
  "t0.7-top4": SamplingConfig(temperature=0.7, top_k=4),
}


@functools.lru_cache(maxsize=1)
def _tiny_sampling_setup():
  """An 8-token vanilla model and an untrained drafter (far from it)."""
  config = tiny_config(
    "vanilla", vocab_size=8, num_layers=1, width=16, head_dim=8, max_len=32, init_std=1.0
  )
  model = build_model(config)
  params = init_params(model, jax.random.key(0))
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=2, **PAPER_HEAD))
  dparams = init_drafter(drafter, jax.random.key(1))
  return model, params, drafter, dparams


def _first_two_tokens(sampling_id, beam_width, rows=4000):
  """Speculative sampling of `rows` copies of one prompt: the total variation
  between the empirical joint distribution of the first two generated tokens
  and the exact one from full forwards, and the accepted drafts per step."""
  from bt_jax.inference.sampling import restrict_logits  # pylint: disable=import-outside-toplevel

  sampling = SAMPLINGS[sampling_id]
  model, params, drafter, dparams = _tiny_sampling_setup()
  prompt = [1, 2, 3]
  out = speculative_generate(
    model,
    params,
    drafter,
    dparams,
    [prompt] * rows,
    max_new_tokens=3,
    sampling=sampling,
    beam_width=beam_width,
    seed=0,
  )
  tokens = np.asarray(out.tokens)
  empirical = np.zeros((8, 8))
  np.add.at(empirical, (tokens[:, 0], tokens[:, 1]), 1.0 / rows)

  def target(logits):
    return np.asarray(jax.nn.softmax(restrict_logits(logits, sampling), axis=-1))

  first = target(model.apply({"params": params}, jnp.asarray([prompt]))[0, -1])
  second = target(
    model.apply({"params": params}, jnp.asarray([prompt + [t] for t in range(8)]))[:, -1]
  )
  exact = first[:, None] * second
  tv = 0.5 * np.abs(empirical - exact).sum()
  per_step = np.asarray(out.accepted).sum() / np.asarray(out.row_steps).sum()
  return tv, per_step


_first_two_tokens_cached = functools.lru_cache(maxsize=8)(_first_two_tokens)


@pytest.mark.parametrize("beam_width", [1, 3], ids=["1draft", "3drafts"])
@pytest.mark.parametrize("sampling_id", list(SAMPLINGS))
def test_speculative_sampling_draws_from_the_target_distribution(sampling_id, beam_width):
  """4000 rows of one prompt, 8-token vocabulary, one or three sampled drafts
  per step: the joint distribution of the first two generated tokens against
  the exact one from full forwards (total variation < 0.05; sampling noise
  here is ~0.015-0.02). A wrong multi-draft rule is off by ~0.15
  (`test_a_wrong_multi_draft_rule_fails_the_sampling_check`)."""
  tv, per_step = _first_two_tokens_cached(sampling_id, beam_width)
  assert tv < 0.05, tv
  assert per_step > 0.1, per_step  # the accept path ran


def test_more_sampled_drafts_accept_more():
  """Same setup: three candidates per depth accept more drafts per step than
  one (0.59 against 0.34 at temperature 1; the sampling noise is ~0.01)."""
  _, one = _first_two_tokens_cached("t1", 1)
  _, three = _first_two_tokens_cached("t1", 3)
  assert three > one + 0.1, (one, three)


def test_a_wrong_multi_draft_rule_fails_the_sampling_check(monkeypatch):
  """Power: testing every candidate against the target p itself instead of
  the residual the earlier rejections left (and drawing the correction from
  p) puts the joint of the first two tokens ~0.15 away from the exact one,
  three times the bound the exact rule passes."""
  from bt_jax.redrafter import speculative  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
  speculative.drafter_generate_fn.cache_clear()  # retrace with the wrong rule
  try:
    tv, _ = _first_two_tokens("t1", 3)
  finally:
    speculative.drafter_generate_fn.cache_clear()  # no wrong compile left behind
  assert tv > 0.1, tv


# The acceptance step alone, on fixed tables: vocabulary 4, C = 2 drafts.
# Target p at the root, after x1 and after (x1, x2) (the bonus); drafter q at
# the root and after x1. Token 3 is impossible for the target at the root
# (like a top-k cut); the drafter proposes it 40% of the time.
_V = 4
_TABLES = np.random.default_rng(0)
_P0 = np.array([0.5, 0.3, 0.2, 0.0])
_Q0 = np.array([0.2, 0.1, 0.3, 0.4])
_P1 = _TABLES.dirichlet(np.ones(_V), size=_V)
_Q1 = _TABLES.dirichlet(np.ones(_V), size=_V)
_P2 = _TABLES.dirichlet(np.ones(_V), size=(_V, _V))


def _accept_on_tables(num_beams, samples, seed=0):
  """`samples` draws of M i.i.d. drafts from the q tables and one acceptance
  step on the packed tree; returns the first three emitted tokens (where the
  step emitted fewer, the rest drawn from the exact target, as the next steps
  would) and the accepted lengths."""
  from bt_jax.redrafter import speculative  # pylint: disable=import-outside-toplevel

  p0, p1, p2, q0, q1 = (jnp.log(jnp.asarray(a, jnp.float32)) for a in (_P0, _P1, _P2, _Q0, _Q1))

  def one(key):
    k1, k2, k_accept = jax.random.split(key, 3)
    x1 = jax.random.categorical(k1, q0, shape=(num_beams,))
    x2 = jax.random.categorical(k2, q1[x1])
    beams = jnp.stack([jnp.zeros_like(x1), x1, x2], axis=1).astype(jnp.int32)  # g0 = 0
    tree = pack_beams(beams)
    node_logits = jnp.stack(
      [jnp.broadcast_to(p0, (num_beams, _V)), p1[x1], p2[x1, x2]], axis=1
    )  # [M, 3, V]
    packed_logits = jnp.zeros((num_beams * 3, _V)).at[tree.unpacker].set(node_logits)
    q_logprobs = jnp.stack([jnp.broadcast_to(q0, (num_beams, _V)), q1[x1]], axis=1)
    # pylint: disable-next=protected-access
    best, accepted, next_token = speculative._accept_sampled_row(
      packed_logits, tree.unpacker, beams, q_logprobs, SamplingConfig(temperature=1.0), k_accept
    )
    return beams[best], accepted, next_token

  beams, accepted, next_token = jax.device_get(
    jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), samples))
  )
  rng = np.random.default_rng(seed)

  def draw(rows):  # one token from each row of [N, V]
    return np.minimum((np.cumsum(rows, -1) < rng.random(len(rows))[:, None]).sum(-1), _V - 1)

  first = np.where(accepted >= 1, beams[:, 1], next_token)
  second = np.where(
    accepted >= 2, beams[:, 2], np.where(accepted == 1, next_token, draw(_P1[first]))
  )
  third = np.where(accepted == 2, next_token, draw(_P2[first, second]))
  return np.stack([first, second, third], axis=1), accepted


def _tables_tv(emitted):
  exact = _P0[:, None, None] * _P1[:, :, None] * _P2
  empirical = np.zeros((_V,) * 3)
  np.add.at(empirical, tuple(emitted.T), 1.0 / len(emitted))
  return 0.5 * np.abs(empirical - exact).sum()


def test_multi_draft_acceptance_is_exact_on_fixed_tables(monkeypatch):
  """40000 acceptance steps on fixed p and q tables, M = 1 and 3 drafts: the
  first three emitted tokens are distributed as p exactly (total variation
  < 0.03 over the 64 sequences; noise ~0.01); the chance of accepting at
  the first depth is the closed form 1 - prod_i r_i (r_i the mass of the
  residual left by i rejections); three drafts accept more than one. The
  rule without the residual update is off by ~0.23 (three drafts)."""
  samples = 40000
  mean_accepted = {}
  for num_beams in (1, 3):
    emitted, accepted = _accept_on_tables(num_beams, samples)
    assert _tables_tv(emitted) < 0.03, (num_beams, _tables_tv(emitted))
    p, all_rejected = _P0.copy(), 1.0
    for _ in range(num_beams):
      residual = np.maximum(p - _Q0, 0.0)
      all_rejected *= residual.sum()
      p = residual / residual.sum()
    assert abs(np.mean(accepted >= 1) - (1 - all_rejected)) < 0.01, num_beams
    mean_accepted[num_beams] = accepted.mean()
  assert mean_accepted[3] > mean_accepted[1] + 0.1, mean_accepted
  from bt_jax.redrafter import speculative  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
  emitted, _ = _accept_on_tables(3, samples)
  assert _tables_tv(emitted) > 0.1, _tables_tv(emitted)


@pytest.mark.multidevice
def test_sharded_speculative_decoding_on_8_devices():
  """8 forced CPU devices: rows split over `data` (8), the KV cache over
  `sequence` (8, Tree Attention, the accepted K/V moved between devices),
  2 x 4 of both, and the model split over a 2 x 2 x 2 (data, fsdp, tensor)
  mesh; greedy with 4 beams and sampling with 2 drafts give one
  device's tokens, lengths, accepted counts and steps; the loop holds an
  eighth of the rows or of the cache per device; bad meshes are errors
  naming the axes."""
  from tests.multidevice import run_check_script  # pylint: disable=import-outside-toplevel

  run_check_script("tests/redrafter/multidevice_speculative.py", checks=12, timeout=1200)


# A base model whose greedy continuation is easy: trained briefly on
# "count up by one" (token t+1 = token t + 1 mod V), then a drafter distilled
# from it briefly (the library's default head, KL against its distributions).
_COUNT_VOCAB = 16


def _counting_rows(rng, rows, length):
  starts = rng.integers(0, _COUNT_VOCAB, size=(rows, 1))
  return ((starts + np.arange(length)[None]) % _COUNT_VOCAB).astype(np.int32)


@functools.lru_cache(maxsize=1)
def _counting_base_and_drafter():
  import optax  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter.train import Objective  # pylint: disable=import-outside-toplevel

  config = tiny_config(
    "vanilla", num_layers=1, width=32, head_dim=16, vocab_size=_COUNT_VOCAB, max_len=48
  )
  model = build_model(config)
  params = init_params(model, jax.random.key(0))
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss(params):
      logits = model.apply({"params": params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  rng = np.random.default_rng(0)
  opt_state = optimizer.init(params)
  for _ in range(120):
    params, opt_state, base_loss = step(params, opt_state, jnp.asarray(_counting_rows(rng, 16, 24)))
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=3))
  prompts = [row[: rng.integers(1, 6)].tolist() for row in _counting_rows(rng, 32, 8)]
  batches = distillation_batches(model, params, prompts, continuation_len=16, batch_size=16)
  dparams, _ = train_drafter(
    model,
    params,
    drafter,
    batches,
    steps=100,
    learning_rate=1e-2,
    progress=False,
    objective=Objective(loss="kl"),
  )
  return model, params, float(base_loss), drafter, dparams


def test_a_distilled_drafter_on_a_trained_base_is_accepted_and_exact():
  """Greedy speculative decoding with a trained base model and a drafter
  distilled from it: most drafts accepted (the untrained drafter accepts
  almost none), and the tokens equal plain greedy decoding, ragged rows."""
  model, params, base_loss, drafter, dparams = _counting_base_and_drafter()
  assert base_loss < 0.1, base_loss
  rng = np.random.default_rng(1)
  prompts = [row[: rng.integers(1, 6)].tolist() for row in _counting_rows(rng, 6, 8)]
  want = generate(model, params, prompts, max_new_tokens=24)
  got = speculative_generate(
    model, params, drafter, dparams, prompts, max_new_tokens=24, beam_width=2
  )
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  drafts = np.asarray(got.row_steps).sum() * drafter.config.draft_len
  acceptance = np.asarray(got.accepted).sum() / drafts
  assert acceptance > 0.8, acceptance
  untrained = speculative_generate(
    model,
    params,
    drafter,
    init_drafter(drafter, jax.random.key(9)),
    prompts,
    max_new_tokens=24,
    beam_width=2,
  )
  np.testing.assert_array_equal(np.asarray(untrained.tokens), np.asarray(want.tokens))
  assert (
    np.asarray(untrained.accepted).sum()
    / (np.asarray(untrained.row_steps).sum() * drafter.config.draft_len)
    < 0.5 * acceptance
  )


def test_packed_tree_gives_each_beams_own_logits():
  """One forward over the packed, deduplicated beams (context + ancestors
  mask, positions context length + depth) against a plain full forward of
  context + beam, beam by beam: the same logits and hidden states at every
  beam position. A causal mask over the packed order instead (each token
  seeing every earlier packed token) does not."""
  from bt_jax.inference.decoding import VanillaDecoder  # pylint: disable=import-outside-toplevel

  model, params = _base()
  context = [5, 6, 7, 8, 9]
  beams = np.array([[3, 11, 12, 13], [3, 11, 14, 15], [3, 11, 12, 16], [3, 17, 18, 19]])
  tree = pack_beams(jnp.asarray(beams))
  num_beams, depth_len = beams.shape
  packed_len = num_beams * depth_len
  decoder = VanillaDecoder(model)
  tokens = jnp.asarray([context])
  prefill = decoder.prefill(params, tokens, jnp.zeros((1,), jnp.int32), packed_len)
  cache_len = len(context) + packed_len
  slots = jnp.arange(cache_len)

  def packed_forward(tree_mask):
    in_tree = slots >= len(context)
    visible = jnp.where(
      in_tree[None, :], jnp.pad(tree_mask, ((0, 0), (len(context), 0)))[:, :cache_len], True
    )
    positions = (len(context) + tree.depth)[None]
    logits, _, hidden = decoder.apply_decode(
      params,
      tree.tokens[None],
      positions,
      prefill["cache"],
      len(context),
      visible[None],
      False,
      True,
    )
    return np.asarray(logits[0])[np.asarray(tree.unpacker)], np.asarray(hidden[0])[
      np.asarray(tree.unpacker)
    ]

  got_logits, got_hidden = packed_forward(tree.mask)
  assert int(tree.num_valid) == 10  # of 16
  full = jnp.asarray([context + list(b) for b in beams])
  want_logits = np.asarray(model.apply({"params": params}, full))[:, len(context) :]
  want_hidden = np.asarray(model.apply({"params": params}, full, method=model.hidden_states))[
    :, len(context) :
  ]
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_hidden, want_hidden, rtol=1e-4, atol=1e-4)
  causal = jnp.tril(jnp.ones((packed_len, packed_len), bool)) & tree.valid[None, :]
  wrong_logits, _ = packed_forward(causal)
  assert np.abs(wrong_logits - want_logits)[1:].max() > 1e-2


# The joint distribution of the first four generated tokens, vocabulary 4:
# the prefill's token, two drafts (the second draft position) and the bonus
# token after both (or the correction drawn from the residual).
_JOINT_ROWS = 20000


@functools.lru_cache(maxsize=1)
def _four_token_setup():
  config = tiny_config(
    "vanilla", vocab_size=4, num_layers=1, width=16, head_dim=8, max_len=32, init_std=1.0
  )
  model = build_model(config)
  params = init_params(model, jax.random.key(3))
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=2))
  dparams = init_drafter(drafter, jax.random.key(4))
  prompt = [1, 2, 3]
  prefixes = [list(p) for n in range(4) for p in itertools.product(range(4), repeat=n)]
  probs = {}
  for n in range(4):
    rows = [p for p in prefixes if len(p) == n]
    logits = model.apply({"params": params}, jnp.asarray([prompt + p for p in rows]))[:, -1]
    for p, row in zip(rows, np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)):
      probs[tuple(p)] = row
  exact = np.zeros((4,) * 4)
  for seq in itertools.product(range(4), repeat=4):
    exact[seq] = np.prod([probs[seq[:i]][seq[i]] for i in range(4)])
  return model, params, drafter, dparams, prompt, exact


def _four_token_tv(beam_width):
  model, params, drafter, dparams, prompt, exact = _four_token_setup()
  out = speculative_generate(
    model,
    params,
    drafter,
    dparams,
    [prompt] * _JOINT_ROWS,
    max_new_tokens=4,
    sampling=SamplingConfig(temperature=1.0),
    beam_width=beam_width,
    seed=5,
  )
  tokens = np.asarray(out.tokens)
  empirical = np.zeros((4,) * 4)
  np.add.at(empirical, tuple(tokens.T), 1.0 / _JOINT_ROWS)
  accepted_both = np.mean(np.asarray(out.accepted) >= 2)
  return 0.5 * np.abs(empirical - exact).sum(), accepted_both


def _four_token_bound():
  """The total variation that exact sampling of _JOINT_ROWS sequences stays
  under: the largest of 20 multinomial draws from the exact joint, plus 25%."""
  exact = _four_token_setup()[-1]
  rng = np.random.default_rng(0)
  draws = rng.multinomial(_JOINT_ROWS, exact.ravel(), size=20) / _JOINT_ROWS
  return 1.25 * max(0.5 * np.abs(d - exact.ravel()).sum() for d in draws)


@pytest.mark.parametrize("beam_width", [1, 2], ids=["1draft", "2drafts"])
def test_first_four_tokens_have_the_exact_joint_distribution(beam_width, monkeypatch):
  """20000 rows, vocabulary 4, two drafts per step: the joint of the first
  four tokens (256 sequences; covers the second draft position and the
  bonus token, both drafts are accepted in a fair share of rows) against
  the exact one from full forwards, under a bound from exact sampling's own
  noise. Power: the rule that draws the correction from p instead of the
  residual max(p - q, 0) exceeds the bound."""
  bound = _four_token_bound()
  tv, accepted_both = _four_token_tv(beam_width)
  assert tv < bound, (tv, bound)
  assert accepted_both > 0.05, accepted_both
  from bt_jax.redrafter import speculative  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
  speculative.drafter_generate_fn.cache_clear()  # retrace with the wrong rule
  try:
    wrong, _ = _four_token_tv(beam_width)
  finally:
    speculative.drafter_generate_fn.cache_clear()
  assert wrong > bound, (wrong, bound)
