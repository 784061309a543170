"""experiments.uptrain_vs_scratch: the two block runs differ only in their
initialisation (gin parsing and the report; the runs themselves are the
training binary's, tested in test_train.py)."""

from __future__ import annotations

import dataclasses

from bt_jax import train
from experiments import uptrain_vs_scratch


def _gin_params(args):
  return [a.split("=", 1)[1] for a in args if a.startswith("--gin_param=")]


def test_scratch_is_the_uptrain_recipe_without_init_from(tmp_path):
  cmds = uptrain_vs_scratch.commands(
    str(tmp_path),
    vanilla_steps=20,
    block_steps=10,
    eval_every=5,
    eval_batches=2,
    extra=["train.seed = 3"],
  )
  configs = {}
  for name in ("uptrained", "scratch"):
    args = cmds[name]
    assert args[:2] == ["bt_jax.train", "--gin_file=runs/uptrain.gin"]
    model, cfg, _ = train.configs_from_gin(["runs/uptrain.gin"], _gin_params(args))
    configs[name] = (model, cfg)
  (up_model, up), (sc_model, sc) = configs["uptrained"], configs["scratch"]
  assert up_model == sc_model and up_model.kind == "block" and up_model.embedder == "projection"
  assert up.init_from == str(tmp_path / "vanilla") and sc.init_from is None
  assert dataclasses.replace(up, init_from=None) == sc
  assert (up.steps, up.optimizer.warmup_steps, up.eval_every, up.eval_batches, up.seed) == (
    10,
    1,
    5,
    2,
    3,
  )
  assert up.data.tokenizer_path == str(tmp_path / "vanilla" / "tokenizer.json")
  vanilla_model, vanilla, _ = train.configs_from_gin(
    ["runs/quickstart_vanilla.gin"], _gin_params(cmds["vanilla"])
  )
  assert vanilla_model.kind == "vanilla" and vanilla.steps == 20 and vanilla.init_from is None


def test_report_table_and_png(tmp_path):
  def run(step, losses):
    return {
      "summary": {"step": step, "final_eval_loss": losses[-1], "unigram_entropy": 6.5},
      "wall_s": 12.0,
      "eval_curve": [[i * 5, loss] for i, loss in enumerate(losses)],
    }

  results = {
    "runs": {
      "vanilla": run(20, [7.6, 6.9]),
      "uptrained": run(10, [7.0, 6.7, 6.6]),
      "scratch": run(10, [7.6, 7.1, 6.9]),
    }
  }
  table = uptrain_vs_scratch.table(results)
  assert "| 5 | 6.7000 | 7.1000 |" in table and "| scratch | 10 | 6.9000 | 6.5000 | 12 |" in table
  png = uptrain_vs_scratch.plot(results, str(tmp_path / "out" / "curves.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
