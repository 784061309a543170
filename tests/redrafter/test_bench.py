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
  from tests.utils import tiny_config  # pylint: disable=import-outside-toplevel
  from bt_jax.models import build_model, init_params  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter import (
    DraftHead,
    DrafterConfig,
    init_drafter,  # pylint: disable=import-outside-toplevel
    speculative_generate,
  )
  from experiments.redrafter_bench import acceptance_stats  # pylint: disable=import-outside-toplevel

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
  with pytest.raises(cli.UserError, match="--base block"):
    cli.call(redrafter_bench, ["--base", "block"])
