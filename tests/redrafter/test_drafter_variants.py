"""Draft-head variants (recurrence, ResBlock width, the base model's head),
the top-k cut, the distillation loss and data, the cost report, drafter.json
formats and the errors for a drafter that does not fit.

References: the recurrences written out from their papers' formulas, a
NumPy beam search with explicit loops (with the cut), KL divergences and
cross-entropies computed one position at a time, XLA's own FLOP count.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.models import build_model, init_params
from bt_jax.redrafter import (
  DraftHead,
  DrafterConfig,
  beam_search,
  init_drafter,
  load_drafter,
  save_drafter,
  speculative_generate,
  teacher_forcing_loss,
)
from bt_jax.redrafter.checkpoint import check_drafter_fits
from bt_jax.redrafter.drafter import base_head_of, drafter_cost, zero_state
from bt_jax.redrafter.train import DistillationData, Objective
from tests.utils import tiny_config

BASE = tiny_config(
  "vanilla", num_layers=1, width=16, head_dim=8, vocab_size=24, max_len=32, init_std=0.5
)
VARIANTS = {
  "paper": dict(lm_head="own", exit_ratio=1.0),
  "default": {},
  "linear-base-2H": dict(recurrence="linear", exit_ratio=1.0),
  "sum-own-narrow": dict(recurrence="sum", lm_head="own", exit_ratio=0.25),
}


@functools.lru_cache(maxsize=1)
def _base():
  model = build_model(BASE)
  return model, init_params(model, jax.random.key(0))


def _drafter(variant, draft_len=3, seed=1):
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=draft_len, **VARIANTS[variant]))
  return drafter, init_drafter(drafter, jax.random.key(seed))


def test_for_base_sizes_and_validation():
  paper = DrafterConfig.for_base(BASE, lm_head="own", exit_ratio=1.0)
  assert (paper.exit_dim, paper.res_dim, paper.lm_head) == (None, 32, "own")
  assert paper == DrafterConfig(vocab_size=24, hidden_dim=16, embed_dim=16)  # the old default
  cheap = DrafterConfig.for_base(BASE)
  assert (cheap.exit_dim, cheap.res_dim, cheap.lm_head, cheap.recurrence) == (
    16,
    16,
    "base",
    "silu",
  )
  with pytest.raises(ValueError, match="recurrence must be one of .*got 'gru'"):
    DrafterConfig.for_base(BASE, recurrence="gru")
  with pytest.raises(ValueError, match="lm_head must be one of .*got 'tied'"):
    DrafterConfig.for_base(BASE, lm_head="tied")
  with pytest.raises(ValueError, match="exit_ratio must be positive; got 0"):
    DrafterConfig.for_base(BASE, exit_ratio=0)


@pytest.mark.parametrize("recurrence", ["silu", "linear", "sum"])
def test_recurrences_follow_their_formulas(recurrence):
  """silu: SiLU(W e + U s + b) (the released code's rnn=True); linear: the
  same without SiLU (TensorRT-LLM); sum: s + e (rnn=False)."""
  config = DrafterConfig(vocab_size=24, hidden_dim=16, embed_dim=16, recurrence=recurrence)
  drafter = DraftHead(config)
  params = init_drafter(drafter, jax.random.key(2))
  rng = np.random.default_rng(0)
  state, embedding = rng.normal(size=(3, 16)), rng.normal(size=(3, 16))
  got = np.asarray(
    drafter.apply(
      {"params": params}, jnp.asarray(state), jnp.asarray(embedding), method=drafter.step
    )
  )
  if recurrence == "sum":
    assert "w" not in params and "u" not in params
    want = state + embedding
  else:
    pre = (
      embedding @ np.asarray(params["w"]["kernel"])
      + state @ np.asarray(params["u"]["kernel"])
      + np.asarray(params["u"]["bias"])
    )
    want = pre / (1 + np.exp(-pre)) if recurrence == "silu" else pre
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_base_head_variant_reads_through_the_base_models_head():
  """lm_head "base": logits = (projected z) @ the base model's kernel; a
  different base kernel changes them, and none is an error."""
  model, params = _base()
  drafter, dparams = _drafter("linear-base-2H")
  assert "lm_head" not in dparams and dparams["head_proj"]["kernel"].shape == (32, 16)
  hidden, state = jnp.ones((2, 16)), jnp.full((2, 16), 0.5)
  head = base_head_of(drafter, params)
  logits = drafter.apply({"params": dparams}, hidden, state, head, method=drafter.logits)
  z = jnp.concatenate([hidden, state], -1)
  for i in range(2):
    block = dparams[f"res_{i}"]
    z = z + jax.nn.silu(z @ block["kernel"] + block["bias"])
  np.testing.assert_allclose(
    logits, z @ dparams["head_proj"]["kernel"] @ head, rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="lm_head='base' needs base_head"):
    drafter.apply({"params": dparams}, hidden, state, method=drafter.logits)


def _numpy_beam_search(
  drafter, params, hidden, g0, table, beam_width, draft_len, head=None, top_k=None
):
  """Beam search with explicit loops over beams and candidates (float64 scores),
  each beam's logits cut to its top_k before the log-softmax."""
  step = jax.jit(functools.partial(drafter.apply, method=drafter.step))
  logits_fn = jax.jit(functools.partial(drafter.apply, method=drafter.logits))
  beams = [((int(g0),), 0.0, np.zeros(drafter.config.state_dim, np.float32))]
  for _ in range(draft_len):
    candidates = []
    for tokens, score, state in beams:
      state = np.asarray(step({"params": params}, state[None], table[tokens[-1]][None]))[0]
      logits = np.asarray(logits_fn({"params": params}, hidden[None], state[None], head))[0].astype(
        np.float64
      )
      allowed = np.arange(len(logits))
      if top_k is not None:
        allowed = np.argsort(-logits)[:top_k]
      kept = logits[allowed]
      log_z = np.log(np.sum(np.exp(kept - kept.max()))) + kept.max()
      candidates += [(tokens + (int(v),), score + float(logits[v] - log_z), state) for v in allowed]
    candidates.sort(key=lambda c: -c[1])
    beams = candidates[:beam_width]
  return np.array([b[0] for b in beams]), np.array([b[1] for b in beams])


@pytest.mark.parametrize(
  "variant,top_k",
  [("default", None), ("sum-own-narrow", None), ("linear-base-2H", 3), ("default", 2)],
)
def test_beam_search_variants_and_top_k_cut_match_numpy(variant, top_k):
  """Each variant (and the cut of the drafter's logits to their top k, the
  released code's, q renormalised over those) against explicit loops. With
  top_k 2 < 3 beams no beam has more than 2 children."""
  model, params = _base()
  drafter, dparams = _drafter(variant)
  table = np.asarray(params["token_embed"]["embedding"])
  head = base_head_of(drafter, params)
  hidden = np.asarray(jax.random.normal(jax.random.key(5), (2, 16)))
  g0 = np.array([4, 9])
  beams, scores = jax.jit(
    functools.partial(beam_search, drafter, beam_width=3, draft_len=3, top_k=top_k)
  )(dparams, jnp.asarray(hidden), jnp.asarray(g0), jnp.asarray(table), base_head=head)
  for row in range(2):
    want_beams, want_scores = _numpy_beam_search(
      drafter, dparams, hidden[row], g0[row], table, 3, 3, head, top_k
    )
    finite = np.isfinite(want_scores)
    np.testing.assert_array_equal(np.asarray(beams)[row][finite], want_beams[finite])
    np.testing.assert_allclose(np.asarray(scores)[row], want_scores, rtol=1e-5, atol=1e-5)
    if top_k is not None and top_k < 3:
      for depth in range(1, 4):
        children = {}
        for beam in np.asarray(beams)[row][finite]:
          children.setdefault(tuple(beam[:depth]), set()).add(int(beam[depth]))
        assert max(len(c) for c in children.values()) <= top_k, children


def test_top_k_cut_of_the_whole_vocabulary_changes_nothing():
  model, params = _base()
  drafter, dparams = _drafter("default")
  hidden, g0 = jax.random.normal(jax.random.key(5), (2, 16)), jnp.array([1, 2])
  args = (drafter, dparams, hidden, g0, params["token_embed"]["embedding"])
  kwargs = dict(beam_width=4, draft_len=3, base_head=base_head_of(drafter, params))
  plain, cut = beam_search(*args, **kwargs), beam_search(*args, **kwargs, top_k=24)
  np.testing.assert_array_equal(plain[0], cut[0])
  with pytest.raises(ValueError, match=r"top_k 25 must be in \[1, vocabulary size 24\]"):
    beam_search(*args, **kwargs, top_k=25)


def _explicit_losses(
  drafter, dparams, hidden, table, tokens, mask, target_mask, teacher, head, temperature
):
  """Per draft step: mean KL (teacher given) or cross-entropy over targets,
  one position at a time in float64."""
  steps = drafter.config.draft_len
  apply = jax.jit(drafter.apply)
  sums, counts = np.zeros(steps), np.zeros(steps)
  batch, length = tokens.shape
  for b, t, i in itertools.product(range(batch), range(length), range(steps)):
    target = t + 2 + i
    if target >= length or not mask[b, target] or not mask[b, t] or not target_mask[b, target]:
      continue
    inputs = jnp.take(table, jnp.asarray(tokens[b, t + 1 : t + 2 + i]), axis=0)[None]
    logits = np.asarray(apply({"params": dparams}, hidden[b, t][None], inputs, head))[0, -1].astype(
      np.float64
    )
    log_q = logits / temperature - np.log(np.sum(np.exp(logits / temperature)))
    if teacher is None:
      sums[i] -= log_q[tokens[b, target]]
    else:
      p_logits = np.asarray(teacher[b, target - 1], np.float64) / temperature
      log_p = p_logits - np.log(np.sum(np.exp(p_logits)))
      sums[i] += temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q))
    counts[i] += 1
  return sums, counts


@pytest.mark.parametrize(
  "variant,kl,temperature",
  [("default", False, 1.0), ("default", True, 1.0), ("sum-own-narrow", True, 2.0)],
)
def test_distillation_loss_against_explicit_positions(variant, kl, temperature):
  """Prompt positions are no targets (target_mask); with the base model's
  logits the loss is temperature^2 * KL(p_T || q_T) of each target token."""
  model, params = _base()
  drafter, dparams = _drafter(variant)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 24, size=(2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, 7:] = 0
  target_mask = mask.copy()
  target_mask[0, :4] = 0  # row 0: a 4-token prompt
  target_mask[1, :2] = 0
  hidden = model.apply({"params": params}, jnp.asarray(tokens), method=model.hidden_states)
  teacher = np.asarray(model.apply({"params": params}, jnp.asarray(tokens))) if kl else None
  table, head = params["token_embed"]["embedding"], base_head_of(drafter, params)
  loss, aux = teacher_forcing_loss(
    drafter,
    dparams,
    hidden,
    table,
    jnp.asarray(tokens),
    jnp.asarray(mask),
    base_head=head,
    target_mask=jnp.asarray(target_mask),
    teacher_logits=None if teacher is None else jnp.asarray(teacher),
    temperature=temperature,
    top_k=3,
  )
  sums, counts = _explicit_losses(
    drafter, dparams, hidden, table, tokens, mask, target_mask, teacher, head, temperature
  )
  np.testing.assert_allclose(np.asarray(aux["count_i"]), counts)
  np.testing.assert_allclose(np.asarray(aux["loss_i"]), sums / counts, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(loss), np.sum(sums / counts), rtol=1e-4)
  assert np.all(np.asarray(aux["topk_i"]) >= np.asarray(aux["acc_i"]))
  # Without the target mask, the prompt tokens would count too.
  _, all_aux = teacher_forcing_loss(
    drafter, dparams, hidden, table, jnp.asarray(tokens), jnp.asarray(mask), base_head=head
  )
  all_counts = np.asarray(all_aux["count_i"])
  assert np.all(all_counts >= counts) and all_counts.sum() > counts.sum()


def test_distillation_data_excludes_the_prompts_and_holds_out_rows():
  model, params = _base()
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
  data = DistillationData.generate(model, params, prompts, continuation_len=4)
  for row, prompt in enumerate(prompts):
    np.testing.assert_array_equal(data.target_mask[row, : len(prompt)], 0)
    np.testing.assert_array_equal(data.target_mask[row, len(prompt) : len(prompt) + 4], 1)
  np.testing.assert_array_equal(data.target_mask * (1 - data.mask), 0)
  train, heldout = data.split(0.3, batch_size=2)
  assert len(train.tokens) == 2 and len(heldout.tokens) == 1
  np.testing.assert_array_equal(heldout.tokens, data.tokens[2:])
  text = DistillationData.from_text([[1, 2, 3, 4], [5, 6]])
  np.testing.assert_array_equal(text.target_mask, text.mask)


def test_drafter_cost_counts_params_and_matches_xla_flops():
  """Parameters are the init's; the analytic FLOPs of one draft token are
  XLA's count of the step + logits within 5% (XLA adds the elementwise ops).
  On the quickstart model the default drafter is < 10% of the base model's
  parameters, the paper's head ~52%."""
  for variant in VARIANTS:
    drafter, dparams = _drafter(variant)
    cost = drafter_cost(drafter.config, BASE, beam_width=2, context_len=8)
    assert cost["drafter_params"] == sum(x.size for x in jax.tree.leaves(dparams))
    model, params = _base()
    head = base_head_of(drafter, params)

    def one_token(dparams, state, embedding, hidden):
      state = drafter.apply({"params": dparams}, state, embedding, method=drafter.step)
      return drafter.apply({"params": dparams}, hidden, state, head, method=drafter.logits)

    lowered = jax.jit(one_token).lower(
      dparams, zero_state(drafter.config, (1,)), jnp.zeros((1, 16)), jnp.zeros((1, 16))
    )
    analysis = lowered.compile().cost_analysis()
    xla = float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])
    assert cost["draft_token_flops"] <= xla <= 1.05 * cost["draft_token_flops"] + 2000, (
      variant,
      cost["draft_token_flops"],
      xla,
    )
  quickstart = tiny_config("vanilla", vocab_size=2048, max_len=128, num_layers=4, width=128)
  paper = drafter_cost(
    DrafterConfig.for_base(quickstart, lm_head="own", exit_ratio=1.0), quickstart
  )
  cheap = drafter_cost(DrafterConfig.for_base(quickstart), quickstart)
  assert 0.5 < paper["params_fraction"] < 0.55 and cheap["params_fraction"] < 0.1
  assert cheap["step_fraction"] < 0.6 * paper["step_fraction"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_saves_loads_and_decodes_exactly(variant, tmp_path):
  from bt_jax.inference import generate  # pylint: disable=import-outside-toplevel

  model, params = _base()
  drafter, dparams = _drafter(variant)
  save_drafter(str(tmp_path), drafter, dparams, {"note": 1}, base_config=BASE)
  record = json.loads((tmp_path / "drafter.json").read_text())
  assert record["format"] == 2 and record["base_model"] == {
    "kind": "vanilla",
    "width": 16,
    "vocab_size": 24,
  }
  loaded, loaded_params, meta = load_drafter(str(tmp_path))
  assert loaded.config == drafter.config and meta["note"] == 1
  jax.tree.map(np.testing.assert_array_equal, loaded_params, dparams)
  prompts = [[1, 2, 3], [7]]
  want = generate(model, params, prompts, max_new_tokens=6)
  got = speculative_generate(
    model, params, loaded, loaded_params, prompts, max_new_tokens=6, beam_width=2
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_a_format_1_drafter_loads_as_the_papers_head(tmp_path):
  """drafter.json without "format" (before the variants): the paper's head."""
  drafter, dparams = _drafter("paper")
  save_drafter(str(tmp_path), drafter, dparams)
  record = json.loads((tmp_path / "drafter.json").read_text())
  old_fields = ("vocab_size", "hidden_dim", "embed_dim", "num_res_blocks", "draft_len")
  old = {"config": {k: record["config"][k] for k in old_fields}, "metadata": {"steps": 3}}
  (tmp_path / "drafter.json").write_text(json.dumps(old))
  loaded, loaded_params, meta = load_drafter(str(tmp_path))
  assert loaded.config == drafter.config and meta == {"steps": 3}
  jax.tree.map(np.testing.assert_array_equal, loaded_params, dparams)
  (tmp_path / "drafter.json").write_text(json.dumps({**old, "format": 7}))
  with pytest.raises(ValueError, match="drafter format 7; this bt_jax reads formats 1 to 2"):
    load_drafter(str(tmp_path))
  (tmp_path / "drafter.json").write_text(
    json.dumps({"config": {**old["config"], "lm_head": "base"}})
  )
  with pytest.raises(
    ValueError, match=r"not a drafter config: format 1 has no field \['lm_head'\]"
  ):
    load_drafter(str(tmp_path))


def test_a_drafter_that_does_not_fit_is_an_error_naming_both_sides():
  model, params = _base()
  prompts = [[1, 2]]
  cases = {
    "width": (
      dataclasses.replace(BASE, width=32),
      "made for vocab 24 and width 32; this base model has vocab 24 and width 16",
    ),
    "vocab": (
      dataclasses.replace(BASE, vocab_size=30),
      "made for vocab 30 and width 16; this base model has vocab 24 and width 16",
    ),
  }
  for other, message in cases.values():
    drafter = DraftHead(DrafterConfig.for_base(other, draft_len=2))
    dparams = init_drafter(drafter, jax.random.key(0))
    with pytest.raises(ValueError, match=message):
      speculative_generate(model, params, drafter, dparams, prompts, max_new_tokens=2)
  drafter, dparams = _drafter("default")
  with pytest.raises(
    ValueError, match="trained for a block base model; this base model is vanilla"
  ):
    check_drafter_fits(drafter, BASE, {"kind": "block", "width": 16, "vocab_size": 24})
  with pytest.raises(ValueError, match="drafts for a vanilla base model; this base model is block"):
    check_drafter_fits(drafter, tiny_config("block", vocab_size=24))
  with pytest.raises(ValueError, match="beam_width 25 exceeds the vocabulary \\(24\\)"):
    speculative_generate(model, params, drafter, dparams, prompts, max_new_tokens=2, beam_width=25)
  with pytest.raises(ValueError, match="beam_width must be a positive integer; got -1"):
    speculative_generate(model, params, drafter, dparams, prompts, max_new_tokens=2, beam_width=-1)
  long_drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=32))
  with pytest.raises(ValueError, match="draft_len 32 must be below the base model's max_len 32"):
    speculative_generate(model, params, long_drafter, None, prompts, max_new_tokens=2)
  with pytest.raises(ValueError, match="draft_top_k cuts the drafter's logits before beam search"):
    from bt_jax.inference import SamplingConfig  # pylint: disable=import-outside-toplevel

    speculative_generate(
      model,
      params,
      drafter,
      dparams,
      prompts,
      max_new_tokens=2,
      sampling=SamplingConfig(temperature=1.0),
      draft_top_k=2,
    )
  with pytest.raises(ValueError, match="the drafter loss must be one of .*got 'mse'"):
    Objective(loss="mse")


def test_train_config_validates_the_new_options():
  from bt_jax.train_drafter import DrafterTrainConfig  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match="drafter_train.recipe must be one of .*got 'rl'"):
    DrafterTrainConfig(recipe="rl")
  with pytest.raises(ValueError, match="drafter_train.distill_temperature must be positive"):
    DrafterTrainConfig(distill_temperature=0.0)
  with pytest.raises(ValueError, match=r"drafter_train.heldout_fraction must be in \(0, 1\)"):
    DrafterTrainConfig(heldout_fraction=1.0)
  with pytest.raises(
    ValueError,
    match="drafter_train.draft_len 9 leaves no target in rows of "
    "prompt_len \\+ continuation_len = 10 tokens",
  ):
    DrafterTrainConfig(draft_len=9, prompt_len=5, continuation_len=5)
