"""experiments.redrafter_bench: the grid's JSON schema, the time split and
the per-step records it reads, on a random-weight model (timings are not
checked, only how they are put together)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bt_jax import cli


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel

  out = tmp_path_factory.mktemp("bench") / "grid.json"
  plot = out.parent / "grid.png"
  report = cli.call(
    redrafter_bench,
    [
      "--train_steps",
      "4",
      "--distill_prompts",
      "8",
      "--train_batch",
      "4",
      "--draft_len",
      "3",
      "--batch_sizes",
      "2",
      "--beam_widths",
      "1,3",
      "--draft_lens",
      "3",
      "--max_new_tokens",
      "10",
      "--prompt_len",
      "6",
      "--repeats",
      "3",
      "--warmup",
      "1",
      "--split_repeats",
      "1",
      "--out",
      str(out),
      "--plot",
      str(plot),
    ],
  )
  return report, out, plot


def test_grid_json_schema_and_consistency(grid):
  from experiments.redrafter_bench import POINT_KEYS, SPLIT_KEYS  # pylint: disable=import-outside-toplevel

  report, out, plot = grid
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["meta"]["complete"] and report["meta"]["weights"] == "random"
  assert plot.stat().st_size > 1000
  points = report["results"]
  assert [(p["batch_size"], p["beam_width"], p["draft_len"]) for p in points] == [
    (2, 1, 3),
    (2, 3, 3),
  ]
  for p in points:
    assert tuple(p) == POINT_KEYS and tuple(p["split"]) == SPLIT_KEYS
    assert p["same_tokens_as_greedy"] and p["split"]["parts_same_tokens"]
    depth = p["acceptance_by_depth"]
    assert len(depth) == 3 and all(0 <= a <= 1 for a in depth)
    assert all(a >= b for a, b in zip(depth, depth[1:]))  # P(accepted >= d) falls
    assert p["mean_accepted"] == pytest.approx(sum(depth))
    # EOS / max_new cuts only lower the tokens of a step below accepted + 1.
    assert 1.0 <= p["tokens_per_step"] <= 1.0 + p["mean_accepted"] + 1e-9
    tree = p["beam_width"] * (p["draft_len"] + 1)
    assert p["tree_tokens_per_step"] == pytest.approx(tree * (1 - p["dedupe_removed"]))
    assert p["draft_len"] + 1 <= p["tree_tokens_per_step"] <= tree
    if p["beam_width"] == 1:
      assert p["dedupe_removed"] == 0
    else:  # beam search's beams share g0 at least
      assert p["dedupe_removed"] >= (p["beam_width"] - 1) / tree - 1e-9
    for key in ("greedy_ms", "speculative_ms", "speedup_per_repeat"):
      assert p[key]["min"] <= p[key]["median"] <= p[key]["max"], (key, p[key])
    assert p["speedup"] == pytest.approx(p["greedy_ms"]["median"] / p["speculative_ms"]["median"])
    assert p["speedup_per_repeat"]["max"] <= p["greedy_ms"]["max"] / p["speculative_ms"]["min"]
    s = p["split"]
    assert s["bookkeeping_ms"] == pytest.approx(s["tree_ms"] + s["commit_ms"])
    assert s["parts_ms"] == pytest.approx(s["draft_ms"] + s["verify_ms"] + s["bookkeeping_ms"])
    assert sum(s["shares"].values()) == pytest.approx(1.0)
    assert s["shares"]["verify"] == pytest.approx(s["verify_ms"] / s["parts_ms"])
    assert s["parts_over_loop"] == pytest.approx(s["parts_ms"] / s["loop_step_ms"])
    assert s["timed_steps"] == p["base_steps"]  # one timed generation, every step
    assert min(s[k] for k in ("draft_ms", "verify_ms", "tree_ms", "commit_ms")) > 0


def test_per_step_records_agree_with_the_totals():
  """step_accepted / step_tree_tokens (what the bench reads) against the
  loop's totals and the packed tree of each step."""
  import jax  # pylint: disable=import-outside-toplevel

  from bt_jax.models import build_model, init_params  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter import (
    DrafterConfig,
    DraftHead,
    init_drafter,  # pylint: disable=import-outside-toplevel
    speculative_generate,
  )
  from experiments.redrafter_bench import acceptance_stats  # pylint: disable=import-outside-toplevel
  from tests.utils import tiny_config  # pylint: disable=import-outside-toplevel

  config = tiny_config("vanilla", num_layers=1, width=32, head_dim=16, vocab_size=64, max_len=64)
  model = build_model(config)
  params = init_params(model, jax.random.key(0))
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=2))
  dparams = init_drafter(drafter, jax.random.key(1))
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
  out = speculative_generate(
    model, params, drafter, dparams, prompts, max_new_tokens=9, beam_width=3, eos_id=7
  )
  step_accepted, tree_tokens = np.asarray(out.step_accepted), np.asarray(out.step_tree_tokens)
  assert step_accepted.shape == tree_tokens.shape == (3, 9)
  np.testing.assert_array_equal((step_accepted >= 0).sum(axis=1), np.asarray(out.row_steps))
  np.testing.assert_array_equal(
    np.where(step_accepted >= 0, step_accepted, 0).sum(axis=1), np.asarray(out.accepted)
  )
  assert ((tree_tokens > 0) == (step_accepted >= 0)).all()
  assert ((tree_tokens == 0) | ((tree_tokens >= 3) & (tree_tokens <= 9))).all()
  stats = acceptance_stats(step_accepted, tree_tokens, beam_width=3, draft_len=2)
  assert stats["mean_accepted"] == pytest.approx(
    np.asarray(out.accepted).sum() / np.asarray(out.row_steps).sum()
  )
  assert stats["dedupe_removed"] == pytest.approx(
    1 - tree_tokens.sum() / (9 * np.asarray(out.row_steps).sum())
  )


def test_bad_grid_values_are_one_line_errors():
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel

  with pytest.raises(
    cli.UserError,
    match=r"--beam_widths '2,0': every value must be at least "
    r"1; got \[0\]",
  ):
    cli.call(redrafter_bench, ["--beam_widths", "2,0"])
  with pytest.raises(cli.UserError, match="--base 'moe' must be one of"):
    cli.call(redrafter_bench, ["--base", "moe"])
  with pytest.raises(cli.UserError, match="--sample_beams times speculative sampling for --base"):
    cli.call(redrafter_bench, ["--base", "block", "--sample_beams", "1"])


def test_a_workdir_of_the_other_kind_is_refused_naming_it(tmp_path):
  """The kind is read from the workdir's model config, before any weights."""
  from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel
  from tests.utils import tiny_config  # pylint: disable=import-outside-toplevel

  vanilla, block = tmp_path / "vanilla", tmp_path / "block"
  vanilla.mkdir()
  block.mkdir()
  checkpointing.save_model_config(vanilla, tiny_config("vanilla"))
  checkpointing.save_model_config(block, tiny_config("block"))
  with pytest.raises(
    cli.UserError, match=r"holds a vanilla model; --base block drafts for a block base model"
  ):
    cli.call(redrafter_bench, ["--base", "block", "--workdir", str(vanilla)])
  with pytest.raises(
    cli.UserError, match=r"holds a block model; --base vanilla drafts for a vanilla base model"
  ):
    cli.call(redrafter_bench, ["--workdir", str(block)])


def test_a_drafter_for_another_base_is_refused_before_the_grid(tmp_path):
  """--drafter with --base block: `check_block_drafter_fits` against the
  token decoder, as a one-line error."""
  import jax  # pylint: disable=import-outside-toplevel

  from bt_jax.redrafter import (  # pylint: disable=import-outside-toplevel
    DrafterConfig,
    DraftHead,
    init_drafter,
    save_drafter,
  )
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel
  from tests.utils import tiny_config  # pylint: disable=import-outside-toplevel

  config = tiny_config("vanilla", vocab_size=257, width=32, head_dim=16)
  drafter = DraftHead(DrafterConfig.for_base(config, draft_len=2))
  save_drafter(
    str(tmp_path / "d"), drafter, init_drafter(drafter, jax.random.key(0)), base_config=config
  )
  with pytest.raises(
    cli.UserError, match=r"--drafter .*trained for a vanilla base model; this base model is block"
  ):
    cli.call(redrafter_bench, ["--base", "block", "--drafter", str(tmp_path / "d")])


def test_block_grid_with_a_saved_drafter(tmp_path):
  """--base block --drafter DIR: a drafter saved for the random Block
  Transformer (its token decoder's width) drives the grid; no training."""
  import jax  # pylint: disable=import-outside-toplevel

  from bt_jax.redrafter import (  # pylint: disable=import-outside-toplevel
    DrafterConfig,
    DraftHead,
    init_drafter,
    save_drafter,
  )
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel
  from experiments.redrafter_bench_block import RANDOM_CONFIG  # pylint: disable=import-outside-toplevel

  drafter = DraftHead(DrafterConfig.for_base(RANDOM_CONFIG, draft_len=2))
  save_drafter(
    str(tmp_path / "d"),
    drafter,
    init_drafter(drafter, jax.random.key(0)),
    base_config=RANDOM_CONFIG,
  )
  report = cli.call(
    redrafter_bench,
    [
      "--base",
      "block",
      "--drafter",
      str(tmp_path / "d"),
      "--batch_sizes",
      "1",
      "--beam_widths",
      "2",
      "--draft_lens",
      "1",
      "--max_new_tokens",
      "6",
      "--prompt_len",
      "4",
      "--repeats",
      "1",
      "--warmup",
      "0",
    ],
  )
  assert report["drafter"]["source"] == str(tmp_path / "d")
  assert report["meta"]["train_seconds"] < 60
  (point,) = report["results"]
  assert (point["beam_width"], point["draft_len"]) == (2, 1)
  assert point["same_tokens_as_greedy"] and point["generated_tokens"] == 6


@pytest.fixture(scope="module")
def block_grid(tmp_path_factory):
  from experiments import redrafter_bench  # pylint: disable=import-outside-toplevel

  out = tmp_path_factory.mktemp("block_bench") / "grid.json"
  plot = out.parent / "grid.png"
  report = cli.call(
    redrafter_bench,
    [
      "--base",
      "block",
      "--train_steps",
      "3",
      "--distill_prompts",
      "4",
      "--train_batch",
      "4",
      "--draft_len",
      "2",
      "--batch_sizes",
      "2",
      "--beam_widths",
      "1,2",
      "--draft_lens",
      "2",
      "--max_new_tokens",
      "8",
      "--prompt_len",
      "4",
      "--repeats",
      "1",
      "--warmup",
      "0",
      "--out",
      str(out),
      "--plot",
      str(plot),
    ],
  )
  return report, out, plot


def test_block_grid_json_schema_and_consistency(block_grid):
  from experiments.redrafter_bench import POINT_KEYS  # pylint: disable=import-outside-toplevel
  from experiments.redrafter_bench_block import SPLIT_KEYS  # pylint: disable=import-outside-toplevel

  report, out, plot = block_grid
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["meta"]["complete"] and report["meta"]["weights"] == "random"
  assert report["meta"]["base"] == "block" and report["meta"]["cross_blocks"] is True
  assert plot.stat().st_size > 1000
  drafter = report["drafter"]["config"]
  assert drafter["hidden_dim"] == drafter["embed_dim"] == 64  # the token decoder's width
  points = report["results"]
  assert [(p["batch_size"], p["beam_width"], p["draft_len"]) for p in points] == [
    (2, 1, 2),
    (2, 2, 2),
  ]
  for p in points:
    assert tuple(p) == POINT_KEYS and tuple(p["split"]) == SPLIT_KEYS
    assert p["base"] == "block" and p["same_tokens_as_greedy"]
    assert p["per_step_source"].startswith("derived from an instrumented rerun")
    # Tokens per token-decoder step: every row makes max_new tokens (no EOS),
    # and a step makes 1 + accepted tokens, cut only at max_new.
    assert p["generated_tokens"] == 2 * 8
    row_steps = 16 / p["tokens_per_step"]  # the loop's row_steps summed over the rows
    assert row_steps == pytest.approx(round(row_steps))
    assert p["base_steps"] <= round(row_steps) <= 2 * p["base_steps"]
    assert p["mean_accepted"] * round(row_steps) == pytest.approx(
      round(p["mean_accepted"] * round(row_steps))
    )
    assert 1.0 <= p["tokens_per_step"] <= 1.0 + p["mean_accepted"] + 1e-9
    assert p["base_steps"] <= p["greedy_steps"] == 8
    depth = p["acceptance_by_depth"]
    assert len(depth) == p["draft_len"] and all(0 <= a <= 1 for a in depth)
    assert p["mean_accepted"] == pytest.approx(sum(depth))
    tree = p["beam_width"] * (p["draft_len"] + 1)
    assert p["draft_len"] + 1 <= p["tree_tokens_per_step"] <= tree
    assert p["dedupe_removed"] == pytest.approx(1 - p["tree_tokens_per_step"] / tree)
    if p["beam_width"] == 1:
      assert p["dedupe_removed"] == 0
    for key in ("greedy_ms", "speculative_ms", "speedup_per_repeat"):
      assert p[key]["min"] <= p[key]["median"] <= p[key]["max"], (key, p[key])
    s = p["split"]
    for key in ("prefill_ms", "draft_ms", "verify_ms", "block_step_ms", "greedy_token_step_ms"):
      assert s[key] > 0, key
    # Differences of timings (a call's median less the prefill piece's): on a
    # tiny model they can fall below zero with the machine's noise.
    assert np.isfinite(s["loop_step_ms"]) and np.isfinite(s["greedy_step_ms"])
    assert 0 < s["block_steps_per_step"] <= 1 and 0 < s["verify_steps_per_step"] <= 1
    assert s["pieces_per_step_ms"] == pytest.approx(
      s["verify_steps_per_step"] * (s["draft_ms"] + s["verify_ms"])
      + s["block_steps_per_step"] * s["block_step_ms"]
    )
    assert s["bookkeeping_ms"] == pytest.approx(s["loop_step_ms"] - s["pieces_per_step_ms"])
    assert s["verify_over_greedy_token_step"] == pytest.approx(
      s["verify_ms"] / s["greedy_token_step_ms"]
    )


@pytest.mark.parametrize("cross_blocks", [False, True])
def test_block_step_records_agree_with_the_loop(cross_blocks):
  """The per-step records derived from the instrumented rerun against the
  block loop's own totals (row_steps, accepted), drafts within the block and
  across its boundary; a wrong greedy reference makes them inconsistent."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bt_jax.inference import generate  # pylint: disable=import-outside-toplevel
  from bt_jax.inference.generation import prepare_prompts  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter import DrafterConfig, DraftHead, init_drafter  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter.block_speculative import block_drafter_generate_fn  # pylint: disable=import-outside-toplevel
  from experiments.redrafter_bench_block import (  # pylint: disable=import-outside-toplevel
    block_acceptance_stats,
    step_records,
  )
  from tests.utils import tiny_model  # pylint: disable=import-outside-toplevel

  model, params = tiny_model("block", vocab_size=64, max_len=64, init_std=0.3)
  drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=2))
  dparams = init_drafter(drafter, jax.random.key(1))
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  batch = prepare_prompts(prompts, model.config, 9)
  tokens, pad = jnp.asarray(batch.tokens), jnp.asarray(batch.pad)
  out = block_drafter_generate_fn(model, drafter, 2, 9, cross_blocks=cross_blocks)(
    params, dparams, tokens, pad, jnp.int32(-1), jax.random.key(0)
  )
  reference = np.asarray(generate(model, params, prompts, max_new_tokens=11).tokens)
  np.testing.assert_array_equal(reference[:, :9], np.asarray(out.tokens))
  recs = step_records(
    model, drafter, dparams, params, 2, 9, tokens, pad, out, reference, cross_blocks
  )
  assert recs["consistent"]
  accepted, tree = recs["step_accepted"], recs["step_tree_tokens"]
  np.testing.assert_array_equal((accepted >= 0).sum(1), np.asarray(out.row_steps))
  np.testing.assert_array_equal(
    np.where(accepted >= 0, accepted, 0).sum(1), np.asarray(out.accepted)
  )
  assert ((tree == 0) | ((tree >= 3) & (tree <= 6))).all()
  stats = block_acceptance_stats(accepted, tree, beam_width=2, draft_len=2)
  assert stats["mean_accepted"] == pytest.approx(
    np.asarray(out.accepted).sum() / np.asarray(out.row_steps).sum()
  )
  # A wrong reference is caught, not turned into numbers.
  wrong = reference.copy()
  wrong[:, 1] = (wrong[:, 1] + 1) % 64
  assert not step_records(
    model, drafter, dparams, params, 2, 9, tokens, pad, out, wrong, cross_blocks
  )["consistent"]


def test_block_step_records_with_perfect_drafts():
  """Drafts that are greedy's own next tokens (one beam right, one wrong at
  its second draft): every step accepts, within the block (step one) and
  across its boundary (step two). The derivation's cap must be the loop's:
  the records agree with the loop that ran and not with the other one."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bt_jax.inference import generate  # pylint: disable=import-outside-toplevel
  from bt_jax.inference.generation import prepare_prompts  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter import DrafterConfig, DraftHead, init_drafter  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter.block_speculative import block_speculative_generate_fn  # pylint: disable=import-outside-toplevel
  from experiments.redrafter_bench_block import step_records  # pylint: disable=import-outside-toplevel
  from tests.utils import tiny_model  # pylint: disable=import-outside-toplevel

  model, params = tiny_model("block", vocab_size=64, max_len=64, init_std=0.3)
  assert model.config.block_len == 4
  drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=2))
  dparams = init_drafter(drafter, jax.random.key(1))
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  batch = prepare_prompts(prompts, model.config, 9)
  tokens, pad = jnp.asarray(batch.tokens), jnp.asarray(batch.pad)
  reference = np.asarray(generate(model, params, prompts, max_new_tokens=11).tokens)
  ref = jnp.asarray(reference)

  def oracle(hidden, g0, n_out, step):
    del hidden, step
    rest = jax.vmap(lambda r, n: jax.lax.dynamic_slice(jnp.pad(r, (0, 8)), (n + 1,), (2,)))(
      ref, n_out
    )
    beam = jnp.concatenate([g0[:, None], rest], 1)
    return jnp.stack([beam.at[:, 2].set((beam[:, 2] + 1) % 64), beam], 1)

  # Within the block: j = 0 accepts 2, then g_0 at j = 3 ends the block
  # (no drafts); across it every step accepts both drafts.
  expect = {False: [2, 0, 2, 0, 2], True: [2, 2, 2]}
  for cross in (False, True):
    out = block_speculative_generate_fn(
      model, oracle, num_beams=2, draft_len=2, max_new_tokens=9, cross_blocks=cross
    )(params, tokens, pad, jnp.int32(-1))
    np.testing.assert_array_equal(reference[:, :9], np.asarray(out.tokens))
    assert np.asarray(out.row_steps).tolist() == [len(expect[cross])] * 2
    for assumed in (False, True):
      recs = step_records(
        model, drafter, dparams, params, 2, 9, tokens, pad, out, reference, assumed, draft_fn=oracle
      )
      assert recs["consistent"] == (assumed == cross), (cross, assumed)
      if assumed == cross:
        assert recs["step_accepted"].tolist() == [expect[cross]] * 2
