"""`python -m bt_jax.convert` end to end, and the other binaries on its output:
a converted workdir is an ordinary workdir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import safetensors.torch

from tests.convert import hf_models
from tests.convert.official_block import random_official

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = str(REPO / "tests" / "eval" / "fixtures")


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
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


@pytest.mark.slow
def test_from_hf_then_every_binary(tmp_path):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "wd")
  hf_models.save_hf_model(hf_dir, hf_models.gpt_neox_config(max_position_embeddings=256))
  result = _run("bt_jax.convert", "from_hf", "--input", hf_dir, "--workdir", workdir)
  assert result.returncode == 0, result.stderr[-3000:]

  generated = _run(
    "bt_jax.generate",
    "--workdir",
    workdir,
    "--prompt",
    "The quick brown",
    "--max_new_tokens",
    "8",
    "--temperature",
    "0",
  )
  assert generated.returncode == 0, generated.stderr[-3000:]
  zero_shot = _run(
    "bt_jax.eval_zero_shot",
    "--workdir",
    workdir,
    "--task",
    "hellaswag=" + os.path.join(FIXTURES, "hellaswag_val.jsonl"),
    "--batch_size",
    "4",
    "--out",
    str(tmp_path / "zs.json"),
  )
  assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
  assert json.loads((tmp_path / "zs.json").read_text())["results"]["hellaswag"]["num_docs"] == 4
  (tmp_path / "book.txt").write_text(hf_models.TEXTS[0] * 10)
  perplexity = _run(
    "bt_jax.eval_perplexity",
    "--workdir",
    workdir,
    "--data",
    str(tmp_path / "*.txt"),
    "--out_dir",
    str(tmp_path / "ppl"),
    "--batch_size",
    "2",
    "--bin_size",
    "16",
    "--max_windows",
    "2",
  )
  assert perplexity.returncode == 0, perplexity.stderr[-3000:]
  drafter = _run(
    "bt_jax.train_drafter",
    f"--workdir={workdir}",
    "--gin_file=runs/drafter.gin",
    f"--gin_param=drafter_train.out = '{tmp_path / 'drafter'}'",
    "--gin_param=drafter_train.steps = 2",
    "--gin_param=drafter_train.num_prompts = 4",
    "--gin_param=drafter_train.prompt_len = 8",
    "--gin_param=drafter_train.continuation_len = 8",
    "--gin_param=drafter_train.batch_size = 2",
    "--gin_param=drafter_train.draft_len = 2",
  )
  assert drafter.returncode == 0, drafter.stderr[-3000:]

  back = _run("bt_jax.convert", "to_hf", "--workdir", workdir, "--output", str(tmp_path / "back"))
  assert back.returncode == 0, back.stderr[-3000:]
  assert os.path.isfile(tmp_path / "back" / "model.safetensors")


@pytest.mark.slow
def test_cli_errors_are_one_line_and_leave_nothing(tmp_path):
  hf_dir = str(tmp_path / "hf")
  hf_models.save_hf_model(hf_dir, hf_models.gpt_neox_config())
  config = json.loads(pathlib.Path(hf_dir, "config.json").read_text())
  config["model_type"] = "llama"
  pathlib.Path(hf_dir, "config.json").write_text(json.dumps(config))
  result = _run("bt_jax.convert", "from_hf", "--input", hf_dir, "--workdir", str(tmp_path / "out"))
  # A user error: one line on stderr, exit status 2, as in the other binaries (bt_jax.cli).
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().startswith("error: ") and "is not GPT-NeoX" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  bad_dtype = _run(
    "bt_jax.convert",
    "from_hf",
    "--input",
    hf_dir,
    "--workdir",
    str(tmp_path / "out"),
    "--dtype",
    "float16",
  )
  assert bad_dtype.returncode == 2 and "--dtype=float16" in bad_dtype.stderr
  assert "bfloat16|float32" in bad_dtype.stderr
  assert len(bad_dtype.stderr.strip().splitlines()) == 1, bad_dtype.stderr
  missing = _run(
    "bt_jax.convert",
    "to_hf",
    "--workdir",
    str(tmp_path / "nothing_here"),
    "--output",
    str(tmp_path / "out"),
  )
  assert missing.returncode == 2 and "nothing_here" in missing.stderr
  assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
  assert not [p for p in os.listdir(tmp_path) if "out" in p]


@pytest.mark.slow
def test_from_block_transformer_cli(tmp_path):
  checkpoint = tmp_path / "checkpoint-40"
  checkpoint.mkdir()
  safetensors.torch.save_file(
    random_official().official_state_dict(), str(checkpoint / "model.safetensors")
  )
  hf_models.tokenizer().save(str(checkpoint / "tokenizer.json"))
  workdir = str(tmp_path / "wd")
  result = _run(
    "bt_jax.convert",
    "from_block_transformer",
    "--input",
    str(checkpoint),
    "--gin_file",
    "models/block_b4_tiny.gin",
    "--workdir",
    workdir,
    "--eval_no_pad",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads(pathlib.Path(workdir, "model_config.json").read_text())
  assert config["kind"] == "block" and config["config"]["eval_no_pad"] is True
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["40"]
