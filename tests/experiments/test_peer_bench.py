"""`python -m experiments.peer_bench`: its input checks, statistics and a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bt_jax import cli
from experiments import peer_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_weights(monkeypatch):
  """Fails the test if any weights are made or exported."""

  def refuse(*args, **kwargs):
    raise AssertionError("weights were made before the input was checked")

  monkeypatch.setattr(peer_bench, "init_params", refuse)
  monkeypatch.setattr(peer_bench, "export_to_hf", refuse)


def test_unknown_model_is_refused_with_the_valid_names(no_weights):
  with pytest.raises(cli.UserError) as e:
    peer_bench.run(models="vanilla_5m,vanila_19m", scenarios="tiny=4/4")
  message = str(e.value)
  assert "unknown model 'vanila_19m'" in message
  assert "vanilla_19m" in message and "block_b4_5m" in message
  assert "vanilla_base" not in message  # an include file, not a model


def test_scenario_longer_than_the_context_is_refused(no_weights):
  # vanilla_tiny's max_len is 128; decode_heavy (cpu) is 16 + 256.
  with pytest.raises(cli.UserError) as e:
    peer_bench.run(models="vanilla_tiny", scenarios="tiny=8/8,decode_heavy")
  message = str(e.value)
  assert "scenario 'decode_heavy'" in message and "'vanilla_tiny'" in message
  assert "context of 128" in message and "scenarios that fit: ['tiny']" in message
  # a block model is checked too, and through its transformers partner
  with pytest.raises(cli.UserError, match="longer than model 'block_b4_tiny'"):
    peer_bench.run(models="block_b4_tiny", scenarios="long=100/100")
  with pytest.raises(cli.UserError, match="context of 64"):
    peer_bench.run(models="vanilla_tiny", scenarios="tiny=40/40", context=64)


def test_unknown_scenario_and_bad_numbers_are_refused(no_weights):
  with pytest.raises(cli.UserError, match="unknown scenario 'decode'.*decode_heavy"):
    peer_bench.run(models="vanilla_tiny", scenarios="decode")
  with pytest.raises(cli.UserError, match="batch_size must be a positive integer, got 0"):
    peer_bench.run(models="vanilla_tiny", scenarios="tiny=4/4", batch_size=0)
  with pytest.raises(cli.UserError, match="repeats must be at least 1"):
    peer_bench.run(models="vanilla_tiny", scenarios="tiny=4/4", repeats=0)


def test_missing_torch_says_how_to_install(no_weights, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(cli.UserError, match="pip install -r requirements-test.txt"):
    peer_bench.run(models="vanilla_tiny", scenarios="tiny=4/4")


def test_gpu_preset_needs_a_gpu(no_weights):
  import jax  # pylint: disable=import-outside-toplevel

  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(cli.UserError, match="--preset gpu needs a CUDA GPU"):
    peer_bench.run(preset="gpu", models="vanilla_5m", scenarios="decode_heavy")


def test_first_divergence_and_ratios():
  a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  b = a.copy()
  assert peer_bench.first_divergence(a, b) == 4
  b[1, 2] = 0
  assert peer_bench.first_divergence(a, b) == 2
  b[0, 1] = 0
  assert peer_bench.first_divergence(a, b) == 1
  bt = {
    "model": "vanilla_5m",
    "scenario": "s",
    "batch_size": 8,
    **peer_bench.summary([1.0, 2.0, 4.0], work=8),
  }
  hf = {"model": "vanilla_5m", **peer_bench.summary([4.0, 8.0, 2.0], work=8)}
  assert bt["tokens_per_s"] == 4.0 and bt["tokens_per_s_min"] == 2.0
  c = peer_bench.comparison(bt, hf, "same weights")
  assert c["ratio"] == 2.0  # median 2 s vs 4 s
  assert c["ratio_min"] == pytest.approx(0.5)  # slowest bt (4 s) / fastest hf (2 s)
  assert c["ratio_max"] == pytest.approx(8.0)  # fastest bt (1 s) / slowest hf (8 s)
  assert c["round_ratios"] == [4.0, 4.0, 0.5]
  assert "paper_ratio" not in c
  block = peer_bench.comparison(
    {**bt, "model": "block_b4_5m", "scenario": "decode_heavy"}, hf, "equal non-embedding size"
  )
  assert block["paper_ratio"] == pytest.approx(809.5 / 41.6)


@pytest.mark.slow
def test_tiny_run_agrees_with_transformers(tmp_path):
  """The binary end to end on tiny models: same tokens, the report's fields."""
  out = tmp_path / "new" / "peer.json"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.peer_bench",
      "--models=vanilla_tiny,block_b4_tiny",
      "--scenarios=tiny=8/12",
      "--batch_size=2",
      "--repeats=2",
      "--warmup=1",
      "--hf_compile=off",
      "--cache_segments=2",
      "--profile",
      f"--out={out}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["complete"] and report["groups"] == {
    "vanilla_tiny": ["vanilla_tiny", "block_b4_tiny"]
  }
  engines = [(r["engine"], r["model"]) for r in report["results"]]
  assert engines == [
    ("bt_jax", "vanilla_tiny"),
    ("bt_jax", "block_b4_tiny"),
    ("hf", "vanilla_tiny"),
  ]
  for r in report["results"]:
    assert len(r["wall_s_repeats"]) == 2 and r["batch_size"] == 2 and r["new_tokens"] == 12
    assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
  hf = report["results"][-1]
  assert hf["mode"] == "eager_dynamic" and hf["attn_implementation"] == "sdpa"
  same, block = report["comparisons"]
  assert same["pair"] == "same weights" and same["tokens_agree"]
  assert same["tokens_agree_first"] == 12  # every generated token
  assert same["ratio_min"] <= same["ratio"] <= same["ratio_max"]
  assert block["bt_model"] == "block_b4_tiny" and block["pair"] == "tiny test pair"
  assert block["paper_ratio"] is None
  assert "bt_jax / transformers" in proc.stdout
  # --profile: one more call of each side, time per op (the models' matmuls
  # among the ops named; the shares of the listed top ops add up to at most 1).
  for r in report["results"]:
    ops = [p["op"] for p in r["profile"]]
    assert 0.0 < sum(p["share"] for p in r["profile"]) <= 1.0 + 1e-9
    if r["engine"] == "bt_jax":
      assert any("dot_general" in op for op in ops), ops
    else:
      assert any(op in ("aten::mm", "aten::addmm", "aten::linear") for op in ops), ops
  assert "time per op" in proc.stdout


@pytest.mark.slow
def test_bad_model_exits_2_naming_it():
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.peer_bench", "--models=gpt2"],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: unknown model 'gpt2'; valid names are [")
