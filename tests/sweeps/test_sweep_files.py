"""Sweep files: grid expansion, stable names, shipped sweeps, and bad files
rejected with one error before anything starts (no Ray, no training)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import sweep
from tests.utils import write_file

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted(
  str(p.relative_to(REPO / "gin_configs")) for p in (REPO / "gin_configs" / "sweeps").glob("*.gin")
)


def _spec(**kw) -> sweep.SweepSpec:
  return sweep.SweepSpec(name="t", scale="tiny", base_gin_files=("runs/quickstart.gin",), **kw)


def test_product_zip_and_seeds_expand_in_a_stable_order(tmp_path):
  spec = _spec(
    product={"BlockConfig.block_len": [2, 4], "BlockConfig.embedder": ["lookup", "projection"]},
    zip={"BlockConfig.block_layers": [1, 2], "BlockConfig.token_layers": [2, 1]},
    seeds=(0, 1),
    base_bindings=("train.steps = 3",),
  )
  trials = sweep.expand(spec, str(tmp_path))
  assert len(trials) == 2 * 2 * 2 * 2
  assert trials[0].name == "block_len=2,embedder=lookup,block_layers=1,token_layers=2,seed=0"
  assert trials[-1].name == "block_len=4,embedder=projection,block_layers=2,token_layers=1,seed=1"
  assert trials[0].bindings == (
    "train.steps = 3",
    "BlockConfig.block_len = 2",
    "BlockConfig.embedder = 'lookup'",
    "BlockConfig.block_layers = 1",
    "BlockConfig.token_layers = 2",
    "train.seed = 0",
  )
  assert trials[0].workdir == os.path.join(str(tmp_path), trials[0].name)
  assert [t.name for t in sweep.expand(spec, str(tmp_path))] == [t.name for t in trials]  # stable
  assert len({t.name for t in trials}) == len(trials)


def test_names_use_full_keys_only_when_short_ones_clash_and_gin_files_by_stem(tmp_path):
  spec = _spec(
    zip={
      "BlockConfig.max_len": [64, 128],
      "VanillaConfig.max_len": [64, 128],
      "gin_file": ["runs/quickstart.gin", "runs/quickstart_vanilla.gin"],
      "train.learning_rate": [1e-3, 2.5e-4],
    }
  )
  trials = sweep.expand(spec, str(tmp_path))
  assert trials[1].name == (
    "BlockConfig.max_len=128,VanillaConfig.max_len=128,"
    "gin_file=quickstart_vanilla,learning_rate=0.00025"
  )
  assert trials[1].gin_files == ("runs/quickstart.gin", "runs/quickstart_vanilla.gin")
  assert not any(b.startswith("gin_file") for b in trials[1].bindings)


def test_command_of_a_multi_host_trial(tmp_path):
  trial = sweep.expand(_spec(product={"BlockConfig.block_len": [4]}, num_hosts=2), str(tmp_path))[0]
  args = trial.command("python", coordinator="10.0.0.1:1234", process_id=1)
  assert args[:3] == ["python", "-m", "bt_jax.train"]
  assert "--gin_param=BlockConfig.block_len = 4" in args
  assert args[-3:] == ["--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"]


@pytest.mark.parametrize("path", SHIPPED)
@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_shipped_sweeps_build_every_trial(path, scale, tmp_path):
  spec, trials = sweep.load_trials(path, str(tmp_path), scale)  # configs built and checked
  assert spec.scale == scale and len(trials) >= 2


@pytest.mark.parametrize(
  "text, error",
  [
    ('sweep.product = {"BlockConfig.blok_len": [2, 4]}', "blok_len"),
    ('sweep.product = {"BlockConfig.block_len": [3]}', "block_len=3"),  # a value the model rejects
    ('sweep.product = {"BlockConfig.block_len": []}', "grid is empty"),
    ('sweep.seeds = []', "grid is empty"),
    (
      'sweep.zip = {"BlockConfig.block_len": [2, 4], "BlockConfig.prefix_len": [1]}',
      "equal lengths",
    ),
    ('sweep.product = {"BlockConfig.embedder": ["lookup", "lookup"]}', "same name"),
    ('sweep.product = {"train.learning_rate": [1e-3, 0.001]}', "same name"),
    ('sweep.product = {"BlockConfig.block_len": 4}', "must be a list"),
    ('sweep.produkt = {"BlockConfig.block_len": [4]}', "produkt"),
  ],
)
def test_bad_sweep_files_fail_before_anything_runs(text, error, tmp_path):
  path = write_file(
    tmp_path,
    'sweep.name = "bad"\nsweep.base_gin_files = ["runs/quickstart.gin"]\n' + text,
    "sweep.gin",
  )
  with pytest.raises(sweep.SweepError, match=error):
    sweep.load_trials(path, str(tmp_path / "root"))
  assert not (tmp_path / "root").exists()


def test_unknown_scale_and_missing_file(tmp_path):
  path = write_file(
    tmp_path, 'sweep.name = "s"\nsweep.base_gin_files = []\nsweep.seeds = [0]', "sweep.gin"
  )
  with pytest.raises(sweep.SweepError, match="no scale 'huge'.*'tiny', 'paper'"):
    sweep.load_sweep(path, "huge")
  with pytest.raises(sweep.SweepError, match="not found.*block_length"):
    sweep.load_sweep("sweeps/no_such_study.gin")


def test_cli_dry_run_lists_trials_and_a_bad_file_is_one_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.sweep",
      "--sweep=sweeps/block_length.gin",
      f"--root={tmp_path}",
      "--dry_run",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for block_len in (1, 2, 4, 8):
    assert f"block_len={block_len}  [to run]" in result.stdout
    assert f"BlockConfig.block_len = {block_len}" in result.stdout
  assert f"workdir: {tmp_path}/block_len=8" in result.stdout
  assert not os.listdir(tmp_path)

  bad = write_file(
    tmp_path,
    'sweep.name = "b"\nsweep.base_gin_files = ["runs/quickstart.gin"]\n'
    'sweep.zip = {"BlockConfig.block_len": [2, 4], "BlockConfig.prefix_len": [1]}',
    "sweep.gin",
  )
  result = subprocess.run(
    [sys.executable, "-m", "experiments.sweep", f"--sweep={bad}", f"--root={tmp_path}/root"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "equal lengths" in result.stderr and not (tmp_path / "root").exists()
  help_result = subprocess.run(
    [sys.executable, "-m", "experiments.sweep", "--help"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert help_result.returncode == 0 and "--max_retries" in help_result.stdout


def test_finished_trials_are_skipped_without_starting_anything(tmp_path):
  spec = _spec(product={"BlockConfig.block_len": [2, 4]})
  trials = sweep.expand(spec, str(tmp_path))
  for i, trial in enumerate(trials):
    os.makedirs(trial.workdir)
    with open(os.path.join(trial.workdir, "summary.json"), "w") as f:
      json.dump({"final_eval_loss": 3.0 + i}, f)
  states = sweep.run_sweep(spec, trials, str(tmp_path), sweep.RunOptions())  # no Ray started
  assert [(s.state, s.skipped, s.attempts) for s in states] == [("done", True, 0)] * 2
  record = json.loads((tmp_path / "sweep.json").read_text())
  assert record["counts"]["done"] == 2
  assert record["trials"][0]["summary"] == {"final_eval_loss": 3.0}
  assert sweep.best_eval_loss(states) == (3.0, "block_len=2")


def test_resources_and_tpu_host_counts():
  assert sweep.parse_resources("CPU=1,GPU=8") == {"CPU": 1.0, "GPU": 8.0}
  assert sweep.parse_resources('{"TPU": 4}') == {"TPU": 4.0}
  with pytest.raises(ValueError, match="resources_per_trial"):
    sweep.parse_resources("CPU")
  assert [
    sweep._tpu_hosts(t) for t in ("v4-8", "v4-16", "v4-32", "v5p-16", "v5litepod-16", "v6e-8")
  ] == [1, 2, 4, 2, 2, 1]


def test_progress_line_counts_states_and_the_best_eval_loss_so_far(tmp_path):
  trials = sweep.expand(_spec(product={"BlockConfig.block_len": [2, 4, 8]}), str(tmp_path))
  states = [sweep.TrialState(t) for t in trials]
  os.makedirs(trials[0].workdir)
  (pathlib.Path(trials[0].workdir) / "summary.json").write_text(
    json.dumps({"final_eval_loss": 4.5})
  )
  os.makedirs(trials[1].workdir)
  (pathlib.Path(trials[1].workdir) / "metrics.jsonl").write_text(
    '{"step": 1, "train_loss": 5.0}\n{"step": 2, "eval_loss": 4.25}\n{"step": 3, "train_loss": 4.0}\n'
  )
  states[0].state, states[1].state, states[2].state = "done", "running", "failed"
  line = sweep.progress_line(_spec(), states)
  assert (
    line == "sweep t: 1 done, 1 running, 0 pending, 1 failed; best eval loss 4.2500 (block_len=4)"
  )
