"""The drafter binaries end to end on a real (tiny, random-weight) vanilla
workdir: train_drafter writes a drafter that load_drafter reads, and
`bt_jax.generate --drafter` prints the same text as greedy generation."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from bt_jax import checkpointing
from bt_jax.data.tokenizer import train_bpe
from bt_jax.models import build_model, init_params
from bt_jax.redrafter import load_drafter
from tests.processes import sigterm_when
from tests.utils import tiny_config

pytestmark = pytest.mark.slow  # runs the binaries in subprocesses

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, timeout=240, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  try:
    return subprocess.run(
      [sys.executable, "-m", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{args} timed out after {timeout} s:\n{e.stdout}\n{e.stderr}")


@pytest.fixture(scope="module")
def vanilla_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vanilla_run")
  texts = [pathlib.Path(json.__file__).read_text(), pathlib.Path(os.__file__).read_text()]
  tokenizer = train_bpe(texts, vocab_size=384)
  tokenizer.save(workdir / checkpointing.TOKENIZER_FILE)
  config = tiny_config(
    "vanilla", vocab_size=384, num_layers=2, width=32, head_dim=16, max_len=96, init_std=0.3
  )
  checkpointing.save_model_config(workdir, config)
  params = init_params(build_model(config), jax.random.key(0))
  checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
  checkpointer.save(1, params, {"step": np.int32(1)})
  checkpointer.close()
  return workdir


def test_train_drafter_then_generate_with_it(vanilla_workdir, tmp_path):
  out = tmp_path / "drafter"
  bindings = [
    f"drafter_train.out = '{out}'",
    "drafter_train.steps = 6",
    "drafter_train.num_prompts = 8",
    "drafter_train.prompt_len = 16",
    "drafter_train.continuation_len = 16",
    "drafter_train.batch_size = 4",
    "drafter_train.draft_len = 3",
  ]
  result = _run(
    "bt_jax.train_drafter",
    f"--workdir={vanilla_workdir}",
    "--gin_file=runs/drafter.gin",
    *[f"--gin_param={b}" for b in bindings],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["out"] == str(out) and np.isfinite(summary["final_loss"])
  metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == list(range(1, 7))
  assert "drafter_train.steps = 6" in (out / "config.gin").read_text()
  drafter, params, meta = load_drafter(str(out))
  assert drafter.config.draft_len == 3 and drafter.config.vocab_size == 384
  assert meta["steps"] == 6 and meta["base_workdir"] == str(vanilla_workdir)
  assert jax.tree.leaves(params)

  prompt = "def main(argv):"
  plain = _run(
    "bt_jax.generate",
    f"--workdir={vanilla_workdir}",
    f"--prompt={prompt}",
    "--max_new_tokens=24",
    "--temperature=0",
  )
  spec = _run(
    "bt_jax.generate",
    f"--workdir={vanilla_workdir}",
    f"--prompt={prompt}",
    "--max_new_tokens=24",
    "--temperature=0",
    f"--drafter={out}",
    "--beam_width=3",
  )
  assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr[-2000:], spec.stderr[-2000:])
  assert spec.stdout == plain.stdout
  assert "base-model steps" in spec.stderr and "tokens per step" in spec.stderr

  sampled = _run(
    "bt_jax.generate",
    f"--workdir={vanilla_workdir}",
    f"--prompt={prompt}",
    "--max_new_tokens=24",
    "--temperature=0.8",
    "--seed=3",
    f"--drafter={out}",
    "--beam_width=3",
  )  # three sampled drafts, recursive rejection sampling
  assert sampled.returncode == 0 and "tokens per step" in sampled.stderr, sampled.stderr[-2000:]
  # The KV cache split over 2 devices (Tree Attention): the same greedy text.
  sharded = _run(
    "bt_jax.generate",
    f"--workdir={vanilla_workdir}",
    f"--prompt={prompt}",
    "--max_new_tokens=24",
    "--temperature=0",
    f"--drafter={out}",
    "--beam_width=3",
    "--sequence_devices=2",
    devices=2,
  )
  assert sharded.returncode == 0 and sharded.stdout == plain.stdout, sharded.stderr[-2000:]
  bad_gin = _run(
    "bt_jax.train_drafter", f"--workdir={vanilla_workdir}", "--gin_param=drafter_train.steps = 0"
  )
  assert bad_gin.returncode == 2 and "drafter_train.steps must be positive; got 0" in bad_gin.stderr
  missing = _run(
    "bt_jax.generate",
    f"--workdir={vanilla_workdir}",
    f"--prompt={prompt}",
    "--temperature=0",
    f"--drafter={tmp_path / 'nowhere'}",
  )
  assert missing.returncode == 2 and "holds no trained drafter" in missing.stderr


def _drafter_config(out, **overrides):
  from bt_jax.train_drafter import DrafterTrainConfig  # pylint: disable=import-outside-toplevel

  settings = dict(
    out=str(out),
    steps=6,
    num_prompts=8,
    prompt_len=16,
    continuation_len=16,
    batch_size=4,
    draft_len=3,
    checkpoint_every=2,
    learning_rate=3e-3,
  )
  return DrafterTrainConfig(**{**settings, **overrides})


def _records(out):
  return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_drafter_training_resumes_exactly(vanilla_workdir, tmp_path, monkeypatch):
  from bt_jax import train_drafter  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter.train import DistillationData  # pylint: disable=import-outside-toplevel

  whole = train_drafter.train(str(vanilla_workdir), _drafter_config(tmp_path / "whole"))
  assert whole["step"] == 6 and whole["resumed_from"] == 0 and "stopped_at" not in whole
  _, want_params, _ = load_drafter(str(tmp_path / "whole"))
  want = _records(tmp_path / "whole")
  assert [r["step"] for r in want] == list(range(1, 7))
  from experiments import plot_training  # pylint: disable=import-outside-toplevel
  from bt_jax import cli  # pylint: disable=import-outside-toplevel

  curves = plot_training.series(want)
  assert sorted(curves) == ["acc_0", "acc_1", "acc_2", "loss"]  # draft_len 3
  assert curves["acc_1"] == [(r["step"], r["acc_i"][1]) for r in want]
  png = tmp_path / "drafter_curves.png"
  assert cli.call(plot_training, ["--workdir", str(tmp_path / "whole"), "--out", str(png)]) == str(
    png
  )
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  out = tmp_path / "resumed"
  stopped = train_drafter.train(str(vanilla_workdir), _drafter_config(out, stop_at_step=3))
  assert stopped["stopped_at"] == 3 and stopped["step"] == 3
  assert not (out / "drafter.json").exists()  # not a finished drafter
  assert checkpointing.Checkpointer(out, read_only=True).all_steps() == [2, 3]
  assert [r["step"] for r in _records(out)] == [1, 2, 3]
  with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # an uncheckpointed step
    f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")

  def no_generation(*args, **kwargs):
    raise AssertionError("a resumed run must reuse distill_data.npz")

  monkeypatch.setattr(DistillationData, "generate", classmethod(no_generation))
  resumed = train_drafter.train(str(vanilla_workdir), _drafter_config(out))
  assert resumed["resumed_from"] == 3 and resumed["step"] == 6 and "stopped_at" not in resumed
  _, got_params, meta = load_drafter(str(out))
  for got_leaf, want_leaf in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))
  assert _records(out) == want  # losses and accuracies, step by step
  assert meta["final_loss"] == want[-1]["loss"] == resumed["final_loss"]
  assert checkpointing.Checkpointer(out, read_only=True).all_steps() == [4, 6]  # keep 2

  with pytest.raises(ValueError, match=r"another recipe.*learning_rate 0.003 there, 0.01 now"):
    train_drafter.train(str(vanilla_workdir), _drafter_config(out, learning_rate=1e-2))
  with pytest.raises(ValueError, match=r"drafter_train.stop_at_step must be in \[1, steps=6\]"):
    _drafter_config(out, stop_at_step=7)


def test_train_drafter_sigterm_checkpoints_and_exits_cleanly(vanilla_workdir, tmp_path):
  out = tmp_path / "drafter"
  bindings = [
    f"drafter_train.out = '{out}'",
    "drafter_train.steps = 1000000",
    "drafter_train.checkpoint_every = 1000000",
    "drafter_train.num_prompts = 8",
    "drafter_train.prompt_len = 16",
    "drafter_train.continuation_len = 16",
    "drafter_train.batch_size = 4",
    "drafter_train.draft_len = 2",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  # SIGTERM a few seconds into the training loop (one before it stops after step 1).
  returncode, stdout, stderr = sigterm_when(
    [
      sys.executable,
      "-m",
      "bt_jax.train_drafter",
      f"--workdir={vanilla_workdir}",
      *[f"--gin_param={b}" for b in bindings],
    ],
    lambda: (out / "distill_data.npz").exists(),
    cwd=REPO,
    env=env,
    wait=180,
    settle=3,
  )
  assert returncode == 0, stderr[-3000:]
  assert "stopping at step" in stderr and "SIGTERM" in stderr
  stopped_at = json.loads(stdout.strip().splitlines()[-1])["stopped_at"]
  assert stopped_at >= 1
  assert checkpointing.Checkpointer(out, read_only=True).all_steps() == [stopped_at]
  assert [r["step"] for r in _records(out)] == list(range(1, stopped_at + 1))
  assert not (out / "drafter.json").exists()


@pytest.mark.parametrize("recipe", ["distill", "teacher_forcing"])
def test_both_recipes_report_heldout_accuracy(vanilla_workdir, tmp_path, recipe):
  """drafter_train.recipe "distill" (the base model's continuations, the
  prompts no targets, KL) and "teacher_forcing" (text, every token a
  target): held-out top-1 and top-k accuracy per draft step every
  eval_every steps and at the end; drafter.json records the variant and
  the base model."""
  from bt_jax import train_drafter  # pylint: disable=import-outside-toplevel
  from bt_jax.redrafter.train import DistillationData  # pylint: disable=import-outside-toplevel

  out = tmp_path / recipe
  summary = train_drafter.train(
    str(vanilla_workdir),
    _drafter_config(out, steps=4, eval_every=3, recipe=recipe, num_prompts=10, recurrence="sum"),
  )
  held = [r for r in _records(out) if "heldout_acc_i" in r]
  assert [r["step"] for r in held] == [3, 4]
  for record in held:
    acc, topk = np.array(record["heldout_acc_i"]), np.array(record["heldout_topk_i"])
    assert acc.shape == topk.shape == (3,) and np.all((0 <= acc) & (acc <= topk) & (topk <= 1))
    assert len(record["heldout_loss_i"]) == 3
  assert summary["heldout_topk_i"] == held[-1]["heldout_topk_i"]
  data = DistillationData.load(str(out / "distill_data.npz"))
  assert data.tokens.shape[0] == 10
  if recipe == "distill":  # 16-token prompts, then the base model's tokens
    assert not data.target_mask[:, :16].any() and data.target_mask[:, 16:].any()
  else:
    np.testing.assert_array_equal(data.target_mask, data.mask)
  drafter, _, meta = load_drafter(str(out))
  assert (drafter.config.recurrence, drafter.config.lm_head) == ("sum", "base")
  assert meta["recipe"] == recipe and meta["base_model"]["kind"] == "vanilla"
