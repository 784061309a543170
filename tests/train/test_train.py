"""The training binary end to end on a tiny config (a few steps of a 2 x 64 model).

One reference run of the real binary (subprocess) is shared: the resumed run,
the 8-device run and the plot are compared with or drawn from it. In-process
runs share compiled steps (`bt_jax.train` caches them per model and optimizer).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax import checkpointing
from bt_jax import data as data_lib
from bt_jax import train
from bt_jax.models import build_model, init_params, sequence_loss
from tests.multidevice import SHARDING_WARNINGS
from tests.processes import sigterm_when
from tests.utils import tiny_config, TINY_BATCH, TINY_RUN_GIN, TINY_SEQ_LEN, TINY_STEPS, snapshot

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS, SEQ_LEN, BATCH = TINY_STEPS, TINY_SEQ_LEN, TINY_BATCH
RUN_GIN = TINY_RUN_GIN


_COMPILATION_CACHE = {}


def _env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if "dir" in _COMPILATION_CACHE:  # the binary's subprocesses share compiled steps
    env["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE["dir"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  else:
    env.pop("XLA_FLAGS", None)
  return env


def _run(args, timeout: int, devices: int = 1) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(
      [sys.executable, *args],
      cwd=REPO,
      env=_env(devices),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{args} timed out after {timeout} s; output so far:\n{e.stdout}\n{e.stderr}")


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, train.METRICS_FILE), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _losses(workdir, key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in _metrics(workdir) if key in r}


@pytest.fixture(scope="session")
def run_gin(tmp_path_factory) -> str:
  _COMPILATION_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  path = tmp_path_factory.mktemp("gin") / "tiny_run.gin"
  path.write_text(RUN_GIN)
  return str(path)


@pytest.fixture(scope="session")
def reference_run(run_gin, tmp_path_factory):
  """The real binary, uninterrupted: (workdir, stdout summary)."""
  workdir = tmp_path_factory.mktemp("reference")
  result = _run(
    ["-m", "bt_jax.train", f"--gin_file={run_gin}", f"--workdir={workdir}"], timeout=300
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_binary_smoke(reference_run):
  workdir, printed = reference_run
  config = (workdir / "config.gin").read_text()
  assert "train.steps = 6" in config and "BlockConfig.max_len = 64" in config
  assert checkpointing.load_model_config(workdir).max_len == SEQ_LEN
  assert (workdir / "tokenizer.json").exists()
  first, *records = _metrics(workdir)
  # A fresh run evaluates once before its first update: step 0, eval only.
  assert sorted(first) == ["eval_loss", "eval_loss_by_position", "eval_perplexity", "step"]
  assert first["step"] == 0 and math.isfinite(first["eval_loss"])
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for r in records:
    assert (
      math.isfinite(r["train_loss"]) and math.isfinite(r["grad_norm"]) and r["learning_rate"] > 0
    )
    assert len(r["train_loss_by_position"]) == 4
  assert sorted(_losses(workdir, "eval_loss")) == [0, 3, 6]
  assert _losses(workdir, "eval_loss")[STEPS] < first["eval_loss"]
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary == printed
  for key in ("final_eval_loss", "unigram_entropy", "final_eval_perplexity", "tokens_per_s"):
    assert math.isfinite(summary[key]) and summary[key] > 0, key
  assert summary["final_eval_loss"] == _losses(workdir, "eval_loss")[STEPS]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    3,
    6,
  ]
  assert (workdir / "checkpoints" / "6" / "data").is_dir()
  assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())


@pytest.mark.slow
def test_resume_is_exact(run_gin, reference_run, tmp_path):
  reference, _ = reference_run
  model_config, cfg, operative = train.configs_from_gin([run_gin], ["train.stop_at_step = 4"])
  interrupted = train.train_and_evaluate(
    str(tmp_path), model_config, cfg, operative_config=operative
  )
  assert interrupted["stopped_at"] == 4 and "final_eval_loss" not in interrupted
  assert not (tmp_path / "summary.json").exists()
  assert max(_losses(tmp_path, "train_loss")) == 4
  # A record written after the checkpoint by the interrupted attempt is dropped on resume.
  with open(tmp_path / train.METRICS_FILE, "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": 5, "train_loss": 123.0}) + "\n")

  model_config, cfg, operative = train.configs_from_gin([run_gin], [])
  resumed = train.train_and_evaluate(str(tmp_path), model_config, cfg, operative_config=operative)
  for key in ("train_loss", "eval_loss", "grad_norm"):
    want, got = _losses(reference, key), _losses(tmp_path, key)
    assert sorted(got) == sorted(want), key
    np.testing.assert_allclose(
      [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6, err_msg=key
    )
  reference_summary = json.loads((reference / "summary.json").read_text())
  assert resumed["final_eval_loss"] == pytest.approx(reference_summary["final_eval_loss"], rel=1e-6)

  # load_for_inference: the final params reproduce the final eval loss.
  model, params, tokenizer = checkpointing.load_for_inference(tmp_path)
  assert model.config == checkpointing.load_model_config(tmp_path)
  valid = data_lib.load_corpus("stdlib", "validation", max_bytes=30000)
  batches = data_lib.make_eval_batches(
    valid,
    tokenizer,
    seq_len=SEQ_LEN,
    block_len=4,
    batch_size=BATCH,
    num_batches=2,
    packing="block",
    seed=0,
  )
  loss_fn = jax.jit(lambda p, t, m: sequence_loss(model, p, t, m))
  nll = count = 0.0
  for batch in batches:
    _, aux = loss_fn(params, batch["tokens"], batch["mask"])
    nll += float(jnp.sum(aux["token_nll"]))
    count += float(aux["num_tokens"])
  assert nll / count == pytest.approx(resumed["final_eval_loss"], rel=1e-5)
  _, params_at_3, _ = checkpointing.load_for_inference(tmp_path, step=3)
  assert not np.allclose(jax.tree.leaves(params_at_3)[0], jax.tree.leaves(params)[0])
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
    checkpointing.load_for_inference(tmp_path, step=5)


@pytest.mark.slow
def test_grad_accumulation_and_bf16(run_gin, reference_run, tmp_path):
  reference, _ = reference_run
  want = _losses(reference, "train_loss")
  # Two micro-batches of 2 sequences make the same update as one batch of 4.
  model_config, cfg, _ = train.configs_from_gin(
    [run_gin], ["train.grad_accum = 2", "train.stop_at_step = 2"]
  )
  train.train_and_evaluate(str(tmp_path / "accum"), model_config, cfg)
  got = _losses(tmp_path / "accum", "train_loss")
  np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-5)
  # The MFU estimate, with a peak given (CPUs have none to look up).
  model_config, cfg, _ = train.configs_from_gin(
    [run_gin], ["train.peak_flops_per_device = 1e12", "train.stop_at_step = 3"]
  )
  train.train_and_evaluate(str(tmp_path / "mfu"), model_config, cfg)
  timed = [r for r in _metrics(tmp_path / "mfu") if "mfu" in r]
  assert timed, "no record has an MFU estimate"
  for r in timed:
    assert 0 < r["mfu"] < 1
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] * 1e12 / (1e12 * jax.device_count()))
  # Mixed precision: bf16 compute, f32 master weights (what the checkpoint holds).
  model_config, cfg, _ = train.configs_from_gin(
    [run_gin], ["train.compute_dtype = 'bfloat16'", "train.stop_at_step = 2"]
  )
  train.train_and_evaluate(str(tmp_path / "bf16"), model_config, cfg)
  got = _losses(tmp_path / "bf16", "train_loss")
  np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=2e-2)
  model, params, _ = checkpointing.load_for_inference(tmp_path / "bf16")
  assert model.config.dtype == "bfloat16" and model.config.param_dtype == "float32"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.multidevice
def test_sharded_run_matches_single_device(run_gin, reference_run, tmp_path):
  reference, _ = reference_run
  result = _run(
    ["tests/train/multidevice_train.py", run_gin, str(tmp_path)], timeout=1200, devices=8
  )
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for warning in SHARDING_WARNINGS:  # e.g. the embedding lookup resharded by replication
    assert warning not in result.stderr, result.stderr[-3000:]
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["params_sharded"] > report["params_total"] // 2
  assert report["opt_sharded"] > report["params_sharded"]  # Adam's mu and nu follow the params
  assert (
    report["batch_devices"] == 8
    and "data" in report["batch_spec"]
    and "fsdp" in report["batch_spec"]
  )
  # attention, MLP and layer outputs of every layer carry logical constraints
  assert report["activation_constraints"] >= 3 * 2, report["activation_constraints"]
  for key in ("train_loss", "eval_loss"):
    want, got = _losses(reference, key), _losses(tmp_path, key)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose(
      [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5, err_msg=key
    )


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_gin, tmp_path):
  # An absurd learning rate: step 1 is finite, its update overflows the next forward.
  model_config, cfg, _ = train.configs_from_gin(
    [run_gin],
    [
      "optimizer.learning_rate = 1e30",
      "optimizer.warmup_steps = 0",
      "checkpoint.every = 1",
      "train.eval_every = 100",
      "train.steps = 20",
    ],
  )
  with pytest.raises(train.NonFiniteLossError, match=r"at step 2;.*last good checkpoint is step 1"):
    train.train_and_evaluate(str(tmp_path), model_config, cfg)
  assert checkpointing.Checkpointer(tmp_path, read_only=True).all_steps() == [1]
  _, params, _ = checkpointing.load_for_inference(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert max(_losses(tmp_path, "train_loss")) == 1


@pytest.mark.slow
def test_a_fine_tune_starts_with_the_eval_loss_of_its_source(run_gin, reference_run, tmp_path):
  """train.init_from: the step-0 eval (before any update) is the source
  model's own eval loss; a resumed run keeps that one record of step 0."""
  reference, _ = reference_run
  params = [
    f"train.init_from = '{reference}'",
    f"data.tokenizer_path = '{reference / 'tokenizer.json'}'",
    "train.steps = 3",
  ]
  model_config, cfg, operative = train.configs_from_gin(
    [run_gin], params + ["train.stop_at_step = 1"]
  )
  assert (
    train.train_and_evaluate(str(tmp_path), model_config, cfg, operative_config=operative)[
      "stopped_at"
    ]
    == 1
  )
  first = _metrics(tmp_path)[0]
  assert first["step"] == 0 and "train_loss" not in first
  # The source's last eval (step STEPS): same eval batches, same parameters.
  assert first["eval_loss"] == pytest.approx(_losses(reference, "eval_loss")[STEPS], rel=1e-6)
  assert first["eval_loss"] < _losses(reference, "eval_loss")[0]

  model_config, cfg, operative = train.configs_from_gin([run_gin], params)
  train.train_and_evaluate(str(tmp_path), model_config, cfg, operative_config=operative)
  assert [r["step"] for r in _metrics(tmp_path)] == [0, 1, 2, 3]
  assert _metrics(tmp_path)[0] == first


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(run_gin, tmp_path):
  # The vanilla baseline (plain packing), through the binary: a second model file rebinds model.config.
  args = [
    sys.executable,
    "-m",
    "bt_jax.train",
    f"--gin_file={run_gin}",
    "--gin_file=models/vanilla_tiny.gin",
    f"--workdir={tmp_path}",
    "--gin_param=VanillaConfig.num_layers = 1",
    "--gin_param=train.steps = 100000",
    "--gin_param=checkpoint.every = 100000",
    "--gin_param=train.eval_every = 100000",
  ]
  metrics = tmp_path / train.METRICS_FILE
  returncode, stdout, stderr = sigterm_when(
    args,
    lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,  # step 0 + 2
    cwd=REPO,
    env=_env(),
  )
  assert returncode == 0, stderr[-4000:]
  assert "stopping at step" in stderr and "SIGTERM" in stderr
  stopped_at = json.loads(stdout.strip().splitlines()[-1])["stopped_at"]
  assert checkpointing.Checkpointer(tmp_path, read_only=True).all_steps() == [stopped_at]
  assert checkpointing.load_model_config(tmp_path).kind == "vanilla"
  records = _metrics(tmp_path)
  assert records[-1]["step"] <= stopped_at and "train_loss_by_position" not in records[-1]


@pytest.mark.slow
def test_plot_training(reference_run, tmp_path):
  from experiments import plot_training  # pylint: disable=g-import-not-at-top
  from bt_jax import cli  # pylint: disable=g-import-not-at-top

  workdir, _ = reference_run
  out = tmp_path / "curves.png"
  assert cli.call(
    plot_training, ["--workdir", str(workdir), "--workdir", str(workdir), "--out", str(out)]
  ) == str(out)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(cli.UserError, match="has no metrics.jsonl"):
    cli.call(plot_training, ["--workdir", str(tmp_path)])


# --- errors a person can act on --------------------------------------------


def test_gin_errors_name_the_file_or_binding(run_gin):
  with pytest.raises(FileNotFoundError, match="runs/no_such_run.gin"):
    train.configs_from_gin(["runs/no_such_run.gin"], [])
  with pytest.raises(ValueError, match="train.steps 5"):
    train.configs_from_gin([run_gin], ["train.steps 5"])
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by train.grad_accum=4"):
    train.configs_from_gin([run_gin], ["train.batch_size = 6", "train.grad_accum = 4"])
  with pytest.raises(ValueError, match="mesh_shape"):
    train.configs_from_gin([run_gin], ["train.mesh_shape = (2, 2)"])


def _train_with(run_gin, workdir, *params):
  model_config, cfg, _ = train.configs_from_gin([run_gin], list(params))
  return train.train_and_evaluate(str(workdir), model_config, cfg)


def test_data_and_workdir_errors(run_gin, tmp_path):
  with pytest.raises(FileNotFoundError, match="no files match '/no/such/dir/\\*.txt'"):
    _train_with(run_gin, tmp_path / "a", "data.corpus = 'files:/no/such/dir/*.txt'")
  empty = tmp_path / "empty"
  empty.mkdir()
  for i in range(4):
    (empty / f"doc{i}.txt").write_text("  \n")
  with pytest.raises(ValueError, match="has no text"):
    _train_with(
      run_gin,
      tmp_path / "b",
      f"data.corpus = 'files:{empty}/*.txt'",
      "data.validation_fraction = 0.3",
    )
  with pytest.raises(FileNotFoundError, match="not prepared"):
    _train_with(
      run_gin,
      tmp_path / "c",
      "data.corpus = 'tfds:never_prepared'",
      f"data.data_dir = '{tmp_path}'",
    )
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  with pytest.raises(NotADirectoryError, match=str(not_a_dir)):
    _train_with(run_gin, not_a_dir)
  with pytest.raises(ValueError, match=r"mesh_shape \(2, 1, 1\).*needs 2 devices"):
    _train_with(run_gin, tmp_path / "d", "train.mesh_shape = (2, 1, 1)")


def test_checkpoint_round_trip_and_missing_checkpoint(tmp_path):
  config = tiny_config(
    "block",
    vocab_size=300,
    max_len=16,
    block_layers=1,
    block_width=32,
    token_layers=1,
    token_width=32,
  )
  model = build_model(config)
  params = init_params(model, jax.random.key(1))
  checkpointing.save_model_config(tmp_path, config)
  data_lib.train_bpe(["def f(x):\n  return x\n"] * 4, vocab_size=300).save(
    tmp_path / "tokenizer.json"
  )
  with pytest.raises(FileNotFoundError, match=f"workdir '{tmp_path}' has no checkpoints"):
    checkpointing.load_for_inference(tmp_path)
  saver = checkpointing.Checkpointer(tmp_path, keep=2)
  for step in (1, 2, 3):
    saver.save(step, jax.tree.map(lambda x, s=step: x * s, params), {"step": jnp.asarray(step)})
  saver.close()
  assert checkpointing.Checkpointer(tmp_path, read_only=True).all_steps() == [2, 3]
  loaded_model, loaded, tokenizer = checkpointing.load_for_inference(tmp_path)
  assert loaded_model.config == config and tokenizer.vocab_size == 300
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b) * 3), loaded, params
  )
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpointing.load_for_inference(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="has no model_config.json"):
    checkpointing.load_for_inference(tmp_path / "checkpoints")


def test_shipped_run_and_experiment_files_parse():
  for path in sorted((REPO / "gin_configs").glob("*/*.gin")):
    if path.parent.name in ("models", "sweeps") or path.name == "drafter.gin":
      continue  # drafter.gin binds bt_jax.train_drafter (tests/test_gin_configs.py); sweeps: tests/sweeps
    files, params = [str(path)], []
    if path.name in ("pretrain.gin", "quickstart_common.gin"):  # procedures without a model
      files.insert(0, "models/block_b4_tiny.gin")
    if path.name == "pretrain.gin":  # its per-model macros are required
      with pytest.raises(ValueError, match=r"LEARNING_RATE.*%gin.REQUIRED"):
        train.configs_from_gin(files, [])
      params = ["LEARNING_RATE = 6e-4", "BATCH_SIZE = 256", "STEPS = 100"]
    if path.name == "uptrain.gin":  # the source model is required
      with pytest.raises(ValueError, match=r"INIT_FROM.*%gin.REQUIRED"):
        train.configs_from_gin(files, [])
      params = ["INIT_FROM = '/a/vanilla/workdir'"]
    model_config, cfg, operative = train.configs_from_gin(files, params)
    assert "train." in operative, path
    if path.parent.name == "experiments":
      assert model_config.vocab_size == 50304 and cfg.data.tokenizer_path is not None, path
      assert cfg.seq_len == model_config.max_len == 2048 and cfg.compute_dtype == "bfloat16", path
      assert (
        cfg.optimizer.warmup_steps == 3000
        and cfg.optimizer.b2 == 0.95
        and cfg.optimizer.weight_decay == 0.1
      ), path


@pytest.mark.slow
def test_trained_workdir_serves_generate_and_eval_binaries(reference_run, tmp_path):
  """The real checkpoint of a real run, through the real generate / eval binaries
  (their own tests use a stand-in loader)."""
  workdir, _ = reference_run
  model, params, tokenizer = checkpointing.load_for_inference(str(workdir))
  prompt = "def main(argv):"
  from bt_jax.inference import generate  # pylint: disable=g-import-not-at-top

  want = generate(
    model, params, [tokenizer.encode(prompt)], max_new_tokens=8, eos_id=tokenizer.eos_id
  )
  want_ids = [int(t) for t in want.tokens[0, : int(want.lengths[0])] if t != tokenizer.eos_id]
  result = _run(
    [
      "-m",
      "bt_jax.generate",
      f"--workdir={workdir}",
      f"--prompt={prompt}",
      "--max_new_tokens=8",
      "--temperature=0",
      "--no_echo",
    ],
    timeout=240,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == tokenizer.decode(want_ids).strip()  # greedy: the same text
  # No orbax lines: neither its INFO chatter nor the read-only restore warnings.
  assert "/orbax/" not in result.stderr and "Finished load" not in result.stderr
  assert "checkpoint_manager.py" not in result.stderr, result.stderr[-2000:]
  # The KV cache split over 2 devices (tree-merged partials): the same greedy text.
  result = _run(
    [
      "-m",
      "bt_jax.generate",
      f"--workdir={workdir}",
      f"--prompt={prompt}",
      "--max_new_tokens=8",
      "--temperature=0",
      "--sequence_devices=2",
      "--no_echo",
    ],
    timeout=240,
    devices=2,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == tokenizer.decode(want_ids).strip()

  fixtures = REPO / "tests" / "eval" / "fixtures"
  out = tmp_path / "zero_shot.json"
  result = _run(
    [
      "-m",
      "bt_jax.eval_zero_shot",
      f"--workdir={workdir}",
      f"--task=hellaswag={fixtures / 'hellaswag_val.jsonl'}",
      "--limit=2",
      f"--out={out}",
    ],
    timeout=240,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  scores = json.loads(out.read_text())["results"]["hellaswag"]
  assert scores["num_docs"] == 2 and 0.0 <= scores["acc"] <= 1.0

  (tmp_path / "doc.txt").write_text("import os\n\nprint(os.getcwd())\n" * 20)
  result = _run(
    [
      "-m",
      "bt_jax.eval_perplexity",
      f"--workdir={workdir}",
      f"--data={tmp_path / '*.txt'}",
      f"--out_dir={tmp_path / 'ppl'}",
      "--bin_size=16",
    ],
    timeout=240,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
  assert math.isfinite(report["runs"][0]["perplexity"]) and report["runs"][0]["perplexity"] > 1
  # On 2 devices, parameters restored straight onto a (1, 2, 1) mesh (FSDP-split)
  # and batches split 2 ways by default: the same perplexity.
  for mesh_shape in ("auto", "1,2,1"):
    out_dir = tmp_path / f"ppl_{mesh_shape.replace(',', 'x')}"
    result = _run(
      [
        "-m",
        "bt_jax.eval_perplexity",
        f"--workdir={workdir}",
        f"--data={tmp_path / '*.txt'}",
        f"--out_dir={out_dir}",
        "--bin_size=16",
        f"--mesh_shape={mesh_shape}",
      ],
      timeout=240,
      devices=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((out_dir / "perplexity.json").read_text())["runs"][0]
    assert sharded["num_tokens"] == report["runs"][0]["num_tokens"], mesh_shape
    assert abs(sharded["perplexity"] / report["runs"][0]["perplexity"] - 1) < 1e-5, mesh_shape

  # In process: the restore onto a mesh's shardings gives the same values.
  from bt_jax.eval.sharding import eval_sharding_from_flag  # pylint: disable=g-import-not-at-top

  sharding = eval_sharding_from_flag("1,1,1")
  _, placed, _ = checkpointing.load_for_inference(str(workdir), sharding=sharding)
  for x, y, s in zip(
    jax.tree.leaves(params),
    jax.tree.leaves(placed),
    jax.tree.leaves(sharding.param_shardings(model)),
  ):
    assert y.sharding == s
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_paper_experiment_file_trains_on_a_prepared_tfds_dataset(tmp_path):
  """experiments/block_b4_5m.gin (the paper's model and recipe: bf16 compute,
  AdamW, warmup + cosine) as shipped, on a TFDS array_record dataset made by
  prepare_tfds and with a tokenizer.json from a path (as the Pythia one would
  be), shrunk only in batch, length and steps."""
  import sysconfig  # pylint: disable=g-import-not-at-top

  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  texts = tmp_path / "texts"
  texts.mkdir()
  for path in sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:12]:
    (texts / f"{path.parent.name}_{path.stem}.txt").write_text(path.read_text(encoding="utf-8"))
  tokenizer = data_lib.train_bpe([p.read_text() for p in texts.iterdir()], vocab_size=512)
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  prepared = _run(
    [
      "-m",
      "bt_jax.data.prepare_tfds",
      f"--input_glob={texts}/*.txt",
      f"--data_dir={tmp_path / 'tfds'}",
      "--name=tiny_pile",
    ],
    timeout=120,
  )
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  workdir = tmp_path / "run"
  result = _run(
    [
      "-m",
      "bt_jax.train",
      "--gin_file=experiments/block_b4_5m.gin",
      f"--workdir={workdir}",
      "--gin_param=CORPUS = 'tfds:tiny_pile'",
      f"--gin_param=DATA_DIR = '{tmp_path / 'tfds'}'",
      f"--gin_param=TOKENIZER_PATH = '{tmp_path / 'tokenizer.json'}'",
      "--gin_param=BATCH_SIZE = 2",
      "--gin_param=STEPS = 2",
      "--gin_param=train.seq_len = 128",
      "--gin_param=optimizer.warmup_steps = 1",
      "--gin_param=train.eval_every = 2",
      "--gin_param=train.eval_batches = 1",
      "--gin_param=train.log_every = 1",
      "--gin_param=checkpoint.every = 2",
      "--gin_param=train.progress_bar = False",
    ],
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  config = (workdir / "config.gin").read_text()
  for binding in (
    "train.compute_dtype = 'bfloat16'",
    "optimizer.b2 = 0.95",
    "optimizer.weight_decay = 0.1",
    "CORPUS = 'tfds:tiny_pile'",
  ):
    assert binding in config, binding
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["num_params"] == 33_846_272  # block_b4_5m, the paper's 33.9M
  assert math.isfinite(summary["final_eval_loss"]) and summary["steps"] == 2
  assert (workdir / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_process_run(run_gin, workdir, *params, sigterm_process=None, timeout=900):
  """The binary as a 2-process (multi-host) job on CPU: jax.distributed with
  gloo collectives, one device per process, one shared workdir. The timeout
  is per process: a 2-process compile took over 240 s at a load average of 15
  on 2 cores.
  sigterm_process: SIGTERM that process once both have logged a step."""
  env = _env()
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "bt_jax.train",
        f"--gin_file={run_gin}",
        f"--workdir={workdir}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *[f"--gin_param={p}" for p in params],
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    if sigterm_process is not None:
      metrics = workdir / train.METRICS_FILE
      deadline = time.time() + timeout
      while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # step 0 + 2
          break
        time.sleep(0.2)
      procs[sigterm_process].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-4000:]
  return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs], outputs


@pytest.mark.multidevice
def test_two_process_run_resumes_exactly_and_stops_together(run_gin, reference_run, tmp_path):
  """Multi-host through jax.distributed.initialize (2 CPU processes): both
  processes end with the same summary, and train on the global batches of the
  1-process reference run (its losses up to float32 summation order: 1.6e-7
  relative measured, 1e-5 allowed); a run stopped at step 3 and resumed
  logs the losses of the uninterrupted one; a SIGTERM to one process stops
  both at the same step with a checkpoint."""
  full, outputs = _two_process_run(run_gin, tmp_path / "full")
  timing = ("wall_s", "tokens_per_s")
  assert {k: v for k, v in full[0].items() if k not in timing} == {
    k: v for k, v in full[1].items() if k not in timing
  }
  assert full[0]["step"] == STEPS and math.isfinite(full[0]["final_eval_loss"])
  assert "process 1 of 2" in outputs[1][1] or "process 1 of 2" in outputs[1][0]
  assert [r["step"] for r in _metrics(tmp_path / "full")] == list(range(0, STEPS + 1))
  for key in ("train_loss", "eval_loss"):
    want, got = _losses(reference_run[0], key), _losses(tmp_path / "full", key)
    assert sorted(got) == sorted(want), key
    np.testing.assert_allclose(
      [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5, atol=0, err_msg=key
    )

  stopped, _ = _two_process_run(run_gin, tmp_path / "resumed", "train.stop_at_step = 3")
  assert stopped[0]["stopped_at"] == stopped[1]["stopped_at"] == 3
  _two_process_run(run_gin, tmp_path / "resumed")
  assert _losses(tmp_path / "resumed", "train_loss") == _losses(tmp_path / "full", "train_loss")

  preempted, outputs = _two_process_run(
    run_gin,
    tmp_path / "sigterm",
    "train.steps = 100000",
    "checkpoint.every = 100000",
    "train.eval_every = 100000",
    sigterm_process=1,
  )
  assert preempted[0]["stopped_at"] == preempted[1]["stopped_at"]
  assert "SIGTERM or preemption on another host" in outputs[0][1]
  assert checkpointing.Checkpointer(tmp_path / "sigterm", read_only=True).all_steps() == [
    preempted[0]["stopped_at"]
  ]


# ---------------------------------------------------------------------------
# The workdir belongs to one run (bt_jax.workdir), through the real binary.


@pytest.fixture
def reference_copy(reference_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(reference_run[0], copy)
  return copy


@pytest.mark.slow
def test_another_run_in_the_workdir_is_refused_and_nothing_changes(run_gin, reference_copy):
  before = snapshot(reference_copy)
  result = _run(
    [
      "-m",
      "bt_jax.train",
      f"--gin_file={run_gin}",
      f"--workdir={reference_copy}",
      "--gin_param=optimizer.learning_rate = 0.01",
      "--gin_param=BlockConfig.token_layers = 2",
    ],
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "optimizer.learning_rate: this workdir has 0.001, the new run has 0.01" in result.stderr
  assert "model_config.json: token_layers: this workdir has 1, the new run has 2" in result.stderr
  assert "--start_over" in result.stderr
  assert snapshot(reference_copy) == before


@pytest.mark.slow
def test_a_workdir_held_by_a_live_run_is_refused_naming_it(run_gin, reference_copy):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from bt_jax.workdir import WorkdirLock; "
      "lock = WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
      str(reference_copy),
    ],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = snapshot(reference_copy)
    result = _run(
      [
        "-m",
        "bt_jax.train",
        f"--gin_file={run_gin}",
        f"--workdir={reference_copy}",
        "--gin_param=train.steps = 9",
      ],
      timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"in use by a live run (host {socket.gethostname()} pid {holder.pid})" in result.stderr
    assert snapshot(reference_copy) == before
  finally:
    holder.kill()
    holder.wait(timeout=60)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes(
  run_gin, reference_run, reference_copy
):
  step_dir = reference_copy / "checkpoints" / "6" / "params"
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 3)
  # --step at the damaged step: an error naming it and the newest good step.
  with pytest.raises(ValueError, match=r"step 6 .* does not restore .*newest good step is 3"):
    checkpointing.load_for_inference(reference_copy, step=6)
  # Resuming (train.steps may change on resume) skips step 6, moves it aside and
  # continues exactly from step 3.
  result = _run(
    ["-m", "bt_jax.train", f"--gin_file={run_gin}", f"--workdir={reference_copy}"], timeout=300
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert "skipped damaged checkpoint step 6" in result.stderr
  # Log lines a person can follow without a terminal (the bar is off here).
  assert re.search(
    r"step 5/6: train loss \d+\.\d+, learning rate \S+, [\d,]+ tokens/s, "
    r"elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d",
    result.stderr,
  ), result.stderr[-3000:]
  assert re.search(r"eval at step 6: loss \d+\.\d+, perplexity", result.stderr)
  assert "checkpoint saved at step 6" in result.stderr
  damaged = os.listdir(reference_copy / "checkpoints_damaged")
  assert len(damaged) == 1 and damaged[0].startswith("6-")
  assert _losses(reference_copy, "train_loss") == _losses(reference_run[0], "train_loss")
  assert _losses(reference_copy, "eval_loss") == _losses(reference_run[0], "eval_loss")
