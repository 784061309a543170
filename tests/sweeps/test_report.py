"""experiments.report on a fabricated finished sweep (no training)."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys


from experiments import report

REPO = pathlib.Path(__file__).resolve().parents[2]


def _fabricate(root: pathlib.Path) -> None:
  """A finished block-length sweep of 3 trials and 2 seeds, one trial failed."""
  trials = []
  for block_len in (2, 4, 8):
    for seed in (0, 1):
      name = f"block_len={block_len},seed={seed}"
      workdir = root / name
      workdir.mkdir(parents=True)
      failed = block_len == 8 and seed == 1
      if not failed:
        loss = 3.0 + 0.1 * block_len + 0.01 * seed
        (workdir / "summary.json").write_text(
          json.dumps(
            {
              "model": "block",
              "num_params": 1000 * block_len,
              "steps": 10,
              "step": 10,
              "final_eval_loss": loss,
              "final_eval_loss_by_position": [loss + 0.5 - 0.1 * i for i in range(block_len)],
              "tokens_per_s": 100.0 * block_len,
              "wall_s": 12.5,
            }
          )
        )
      trials.append(
        {
          "name": name,
          "workdir": str(workdir),
          "state": "failed" if failed else "done",
          "swept": {"BlockConfig.block_len": block_len, "train.seed": seed},
        }
      )
  (root / "sweep.json").write_text(
    json.dumps(
      {
        "sweep": "block_length",
        "scale": "tiny",
        "source": "sweeps/block_length.gin",
        "trials": trials,
      }
    )
  )


def test_report_table_csv_and_plots(tmp_path):
  _fabricate(tmp_path / "root")
  path = report.build_report(str(tmp_path / "root"), str(tmp_path / "out"))
  text = pathlib.Path(path).read_text()
  assert "| block_len=2,seed=0 | 2 | 0 | done | 3.2000 | 3.7000 | 3.6000 |  |" in text
  assert "| block_len=8,seed=1 | 8 | 1 | failed |" in text
  with open(tmp_path / "out" / "trials.csv") as f:
    rows = list(csv.DictReader(f))
  assert (
    len(rows) == 6 and rows[2]["loss_pos3"] == "3.6000" and rows[0]["train_tokens_per_s"] == "200"
  )
  assert rows[0]["wall_s"] == "12" or rows[0]["wall_s"] == "13"
  for png in ("loss_vs_block_len.png", "pareto.png", "loss_by_position.png"):
    assert (tmp_path / "out" / png).stat().st_size > 5000, png
    assert f"]({png})" in text
  assert not (tmp_path / "out" / "loss_vs_seed.png").exists()


def test_pareto_front():
  points = [(100.0, 3.0), (200.0, 3.5), (150.0, 3.6), (50.0, 2.9), (200.0, 3.4)]
  assert report.pareto_front(points) == [3, 0, 4]


def test_report_cli_errors_on_a_missing_root(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.report",
      f"--root={tmp_path}/none",
      f"--out={tmp_path}/out",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 2 and "error: --root" in result.stderr
