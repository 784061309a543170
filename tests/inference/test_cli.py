"""`python -m bt_jax.generate` and `python -m experiments.throughput`, at tiny sizes.

The generate tests stand in a loader for `bt_jax.checkpointing` (as
tests/eval/test_binaries.py does) that returns a tiny model and a
character-level tokenizer."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types

import pytest

import bt_jax
from bt_jax import generate as generate_cli
from tests.inference.test_generate import model_and_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CharTokenizer:
  """ids 1..127 are characters; 0 is EOS / pad."""

  eos_id = pad_id = 0
  vocab_size = 128

  def encode(self, text):
    return [min(ord(c), 127) or 1 for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


@pytest.fixture
def fake_checkpoints(monkeypatch):
  calls = []

  def load_for_inference(workdir, step=None):
    calls.append((workdir, step))
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    model, params = model_and_params("block-L4")
    return model, params, CharTokenizer()

  fake = types.SimpleNamespace(load_for_inference=load_for_inference)
  monkeypatch.setitem(sys.modules, "bt_jax.checkpointing", fake)
  monkeypatch.setattr(bt_jax, "checkpointing", fake, raising=False)
  return calls


def test_generate_streams_text(fake_checkpoints, tmp_path):
  out = io.StringIO()
  # The settings of test_streaming_chunks_match_generate: its compile is reused.
  text = generate_cli.stream_generate(
    str(tmp_path), "Hello", max_new_tokens=10, temperature=0.0, chunk_tokens=4, out=out
  )
  assert fake_checkpoints == [(str(tmp_path), None)]
  assert out.getvalue() == text + "\n"
  assert 1 <= len(text) <= 10
  again = generate_cli.stream_generate(
    str(tmp_path), "Hello", max_new_tokens=10, temperature=0.0, chunk_tokens=8, out=io.StringIO()
  )
  assert again == text  # chunking does not change the result
  echoed = io.StringIO()
  assert (
    generate_cli.stream_generate(
      str(tmp_path),
      "Hello",
      max_new_tokens=10,
      temperature=0.0,
      chunk_tokens=4,
      out=echoed,
      echo=True,
    )
    == text
  )
  assert echoed.getvalue() == "Hello" + text + "\n"  # the prompt, then the continuation


def test_generate_errors(fake_checkpoints, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    generate_cli.stream_generate(str(tmp_path / "missing"), "Hi", out=io.StringIO())
  with pytest.raises(ValueError, match="prompt is empty"):
    generate_cli.stream_generate(str(tmp_path), "", out=io.StringIO())
  with pytest.raises(ValueError, match="max_len 64"):
    generate_cli.stream_generate(str(tmp_path), "x" * 64, out=io.StringIO())
  with pytest.raises(ValueError, match="exceeds the model's context"):
    generate_cli.stream_generate(str(tmp_path), "x" * 40, max_new_tokens=30, out=io.StringIO())
  with pytest.raises(ValueError, match=r"sequence_devices=99, but there are \d+ devices"):
    generate_cli.stream_generate(str(tmp_path), "Hi", sequence_devices=99, out=io.StringIO())
  with pytest.raises(ValueError, match="exactly one of --prompt and --prompt_file"):
    generate_cli.read_prompt(None, None)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match="prompt is empty"):
    generate_cli.read_prompt(None, str(empty))


@pytest.mark.slow
def test_generate_binary_reports_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
    [sys.executable, "-m", "bt_jax.generate", "--workdir", str(tmp_path), "--prompt", ""],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2
  assert "error: the prompt is empty" in proc.stderr


def test_throughput_smoke(tmp_path):
  from experiments import throughput  # pylint: disable=import-outside-toplevel

  out = tmp_path / "new_folder" / "throughput.json"  # the folder is created
  report = throughput.run(
    models="block_b4_tiny,vanilla_tiny",
    scenarios="tiny=6/5",
    batch_size="auto",
    memory_budget_gb=0.02,
    max_batch_size=2,
    repeats=2,
    warmup=1,
    cache_segments=2,
    out=str(out),
  )
  saved = json.loads(out.read_text())
  assert saved["ratios"] == report["ratios"] and saved["complete"]
  assert [r["model"] for r in report["results"]] == ["block_b4_tiny", "vanilla_tiny"]
  for r in report["results"]:
    assert r["batch_size"] == 2  # the cap: tiny models fit 20 MB many times
    assert r["memory_per_sample_bytes"] > 0
    assert r["tokens_per_s"] > 0 and r["kv_cache_bytes_per_sample"] > 0 and r["mbu"] > 0
    assert len(r["wall_s_repeats"]) == r["repeats"] == 2
    assert r["wall_s_min"] <= r["wall_s"] <= r["wall_s_max"]
    assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
  (ratio,) = report["ratios"]
  assert ratio["pair"] == "tiny test pair"
  assert ratio["ratio"] == pytest.approx(
    ratio["block_tokens_per_s"] / ratio["vanilla_tokens_per_s"]
  )
  assert ratio["ratio_min"] <= ratio["ratio"] <= ratio["ratio_max"]
  block, vanilla = report["results"]
  assert ratio["ratio_min"] == pytest.approx(
    min(vanilla["wall_s_repeats"]) / max(block["wall_s_repeats"])
  )


def test_throughput_keeps_what_was_measured(tmp_path, monkeypatch):
  """A crash in the second measurement leaves the first in the JSON."""
  from experiments import throughput  # pylint: disable=import-outside-toplevel

  real_run_one = throughput.run_one

  def run_one(name, *args, **kwargs):
    if name == "vanilla_tiny":
      raise RuntimeError("out of memory")
    return real_run_one(name, *args, **kwargs)

  monkeypatch.setattr(throughput, "run_one", run_one)
  out = tmp_path / "throughput.json"
  with pytest.raises(RuntimeError, match="out of memory"):
    throughput.run(
      models="block_b4_tiny,vanilla_tiny",
      scenarios="tiny=6/5",
      batch_size="1",
      repeats=1,
      warmup=0,
      cache_segments=1,
      out=str(out),
    )
  saved = json.loads(out.read_text())
  assert not saved["complete"]
  assert [r["model"] for r in saved["results"]] == ["block_b4_tiny"]
  assert [p.name for p in tmp_path.iterdir()] == ["throughput.json"]  # no temporary left


def _named_weight_bytes(params, groups):
  """The old name-based count: the groups' bytes, embedding tables left out."""
  import jax  # pylint: disable=import-outside-toplevel

  total = 0
  for group in groups:
    for path, x in jax.tree_util.tree_leaves_with_path(params[group]):
      if "embedding" not in jax.tree_util.keystr(path):
        total += x.size * x.dtype.itemsize
  return total


@pytest.mark.parametrize("name", ["block_b4_tiny", "vanilla_tiny"])
def test_bytes_moved_reads_sizes_from_the_code(name):
  """The traced step functions read exactly the parameter groups each pass
  was known to read, embedding tables left out; cache slots match caches.py."""
  import jax  # pylint: disable=import-outside-toplevel
  from bt_jax.config import BlockConfig  # pylint: disable=import-outside-toplevel
  from bt_jax.inference import caches  # pylint: disable=import-outside-toplevel
  from bt_jax.models import build_model, init_params  # pylint: disable=import-outside-toplevel
  from experiments import throughput  # pylint: disable=import-outside-toplevel

  config = throughput.benchmark_config(name, "float32", 8, 8)
  model = build_model(config)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  sizes = throughput.per_pass_bytes(model)
  dtype = config.compute_dtype
  if isinstance(config, BlockConfig):
    assert sizes == {
      "weights_per_block": _named_weight_bytes(params, ["embedder", "block_decoder", "expansion"]),
      "weights_per_token": _named_weight_bytes(params, ["token_decoder", "lm_head"]),
      "block_slot": caches.stack_cache_bytes_per_slot(config.block_stack, dtype),
      "token_slot": caches.stack_cache_bytes_per_slot(config.token_stack, dtype),
    }
  else:
    assert sizes == {
      "weights_per_token": _named_weight_bytes(params, ["decoder", "lm_head"]),
      "slot": caches.stack_cache_bytes_per_slot(config.stack, dtype),
    }


def test_auto_batch_size_search(monkeypatch):
  """The search on compiled memory, with a stand-in compiler: 1000 + 100 * batch bytes."""
  from experiments import throughput  # pylint: disable=import-outside-toplevel

  compiled = []

  def fake_compile(fn, params, batch, config, prompt_len):
    compiled.append(batch)
    return f"exe{batch}", 1000 + 100 * batch

  monkeypatch.setattr(throughput, "compile_for", fake_compile)
  found = throughput.auto_batch_size(None, None, None, 8, budget=2550, max_batch=1024)
  assert found["batch_size"] == 15 and found["executable"] == "exe15"
  assert found["memory_per_sample_bytes"] == 100 and found["fixed_memory_bytes"] == 1000
  assert compiled == [1, 2, 15, 16]  # the linear guess, then one more
  compiled.clear()
  monkeypatch.setattr(
    throughput,
    "compile_for",
    lambda fn, params, batch, config, prompt_len: (
      compiled.append(batch) or f"exe{batch}",
      1000 + 100 * batch + (5000 if batch > 40 else 0),
    ),
  )  # a jump the linear guess misses
  found = throughput.auto_batch_size(None, None, None, 8, budget=6000, max_batch=1024)
  assert found["batch_size"] in range(38, 41) and len(compiled) == len(set(compiled))
  assert (
    throughput.auto_batch_size(None, None, None, 8, budget=1e9, max_batch=64)["batch_size"] == 64
  )
  with pytest.raises(ValueError, match="batch 1 needs"):
    throughput.auto_batch_size(None, None, None, 8, budget=500, max_batch=64)
