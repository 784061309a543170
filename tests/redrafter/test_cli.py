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
from bt_jax.config import VanillaConfig
from bt_jax.data.tokenizer import train_bpe
from bt_jax.models import build_model, init_params
from bt_jax.redrafter import load_drafter

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  try:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{args} timed out after {timeout} s:\n{e.stdout}\n{e.stderr}")


@pytest.fixture(scope="module")
def vanilla_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vanilla_run")
  texts = [pathlib.Path(json.__file__).read_text(), pathlib.Path(os.__file__).read_text()]
  tokenizer = train_bpe(texts, vocab_size=384)
  tokenizer.save(workdir / checkpointing.TOKENIZER_FILE)
  config = VanillaConfig(vocab_size=384, num_layers=2, width=32, head_dim=16, max_len=96,
                         init_std=0.3)
  checkpointing.save_model_config(workdir, config)
  params = init_params(build_model(config), jax.random.key(0))
  checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
  checkpointer.save(1, params, {"step": np.int32(1)})
  checkpointer.close()
  return workdir


def test_train_drafter_then_generate_with_it(vanilla_workdir, tmp_path):
  out = tmp_path / "drafter"
  bindings = [f"drafter_train.out = '{out}'", "drafter_train.steps = 6",
              "drafter_train.num_prompts = 8", "drafter_train.prompt_len = 16",
              "drafter_train.continuation_len = 16", "drafter_train.batch_size = 4",
              "drafter_train.draft_len = 3"]
  result = _run("bt_jax.train_drafter", f"--workdir={vanilla_workdir}",
                "--gin_file=runs/drafter.gin", *[f"--gin_param={b}" for b in bindings])
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
  plain = _run("bt_jax.generate", f"--workdir={vanilla_workdir}", f"--prompt={prompt}",
               "--max_new_tokens=24", "--temperature=0")
  spec = _run("bt_jax.generate", f"--workdir={vanilla_workdir}", f"--prompt={prompt}",
              "--max_new_tokens=24", "--temperature=0", f"--drafter={out}", "--beam_width=3")
  assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr[-2000:],
                                                           spec.stderr[-2000:])
  assert spec.stdout == plain.stdout
  assert "base-model steps" in spec.stderr and "tokens per step" in spec.stderr

  sampled = _run("bt_jax.generate", f"--workdir={vanilla_workdir}", f"--prompt={prompt}",
                 "--max_new_tokens=24", "--temperature=0.8", "--seed=3", f"--drafter={out}")
  assert sampled.returncode == 0 and "tokens per step" in sampled.stderr, sampled.stderr[-2000:]
  bad = _run("bt_jax.generate", f"--workdir={vanilla_workdir}", f"--prompt={prompt}",
             f"--drafter={out}", "--sequence_devices=2")
  assert bad.returncode == 1 and "pass --sequence_devices 1" in bad.stderr
  bad_gin = _run("bt_jax.train_drafter", f"--workdir={vanilla_workdir}",
                 "--gin_param=drafter_train.steps = 0")
  assert bad_gin.returncode == 1 and "drafter_train.steps must be positive; got 0" in bad_gin.stderr
  missing = _run("bt_jax.generate", f"--workdir={vanilla_workdir}", f"--prompt={prompt}",
                 "--temperature=0", f"--drafter={tmp_path / 'nowhere'}")
  assert missing.returncode == 1 and "holds no trained drafter" in missing.stderr
