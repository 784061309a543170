"""The two absl binaries end to end, in subprocesses, with a stand-in for
`bt_jax.checkpointing.load_for_inference` that returns a tiny model."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # runs the binaries in subprocesses

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_RUNNER = textwrap.dedent("""
    import runpy, sys, types
    from tests.utils import TOKENIZER_TEXTS, VOCAB_SIZE, eval_model
    from bt_jax.data.tokenizer import train_bpe

    def load_for_inference(workdir, sharding=None):
      assert sharding is None, sharding   # one CPU device: --mesh_shape auto is None
      kind = "block" if "block" in workdir else "vanilla"
      return (*eval_model(kind), train_bpe(TOKENIZER_TEXTS * 4, vocab_size=VOCAB_SIZE))

    sys.modules["bt_jax.checkpointing"] = types.SimpleNamespace(
        load_for_inference=load_for_inference)
    module = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_module(module, run_name="__main__")
""")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
    [sys.executable, "-c", _RUNNER, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_eval_zero_shot(tmp_path):
  out = tmp_path / "zs.json"
  stdout = _run(
    "bt_jax.eval_zero_shot",
    "--workdir",
    str(tmp_path / "block_run"),
    "--task",
    "hellaswag=" + os.path.join(FIXTURES, "hellaswag_val.jsonl"),
    "--task",
    "arc_challenge",
    "--data",
    FIXTURES,
    "--limit",
    "2",
    "--batch_size",
    "4",
    "--out",
    str(out),
  )
  assert "hellaswag" in stdout and "arc_challenge" in stdout
  report = json.loads(out.read_text())
  assert report["model_kind"] == "block"
  assert {k: v["num_docs"] for k, v in report["results"].items()} == {
    "hellaswag": 2,
    "arc_challenge": 2,
  }


def test_eval_perplexity(tmp_path):
  (tmp_path / "book.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
  _run(
    "bt_jax.eval_perplexity",
    "--workdir",
    str(tmp_path / "vanilla_run"),
    "--compare_workdir",
    str(tmp_path / "block_run"),
    "--data",
    str(tmp_path / "*.txt"),
    "--out_dir",
    str(tmp_path / "out"),
    "--batch_size",
    "2",
    "--bin_size",
    "16",
    "--max_windows",
    "3",
  )
  report = json.loads((tmp_path / "out" / "perplexity.json").read_text())
  assert [run["model_kind"] for run in report["runs"]] == ["vanilla", "block"]
  assert report["same_tokenizer"]  # two loads of the same tokenizer.json content
  assert report["runs"][0]["num_windows"] == 3
  assert (tmp_path / "out" / "loss_by_position.png").exists()
