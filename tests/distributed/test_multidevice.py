"""Runs the 8-device checks and a tiny benchmark, each in its own process.

The forced-device flag must never be set in the pytest process, and a
multi-device process can hang on 2 cores: hence subprocesses with timeouts.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.multidevice import run_check_script

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(args, timeout):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  # Put the checkout first so that its packages win over any stale install.
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  try:
    return subprocess.run(
      [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{args} timed out after {timeout} s; output so far:\n{e.stdout}\n{e.stderr}")


@pytest.mark.multidevice
def test_all_methods_agree_with_the_oracle_on_8_devices():
  run_check_script("tests/distributed/multidevice_checks.py", min_checks=20)


@pytest.mark.multidevice
def test_benchmark_runs_and_reads_traffic_from_hlo(tmp_path):
  result = _run(
    [
      "-m",
      "experiments.tree_vs_ring",
      "--preset",
      "cpu",
      "--contexts",
      "512,1024",
      "--devices",
      "2,4",
      "--methods",
      "tree,ring_kv",
      "--heads",
      "2",
      "--kv_heads",
      "1",
      "--head_dim",
      "8",
      "--warmup",
      "0",
      "--repeats",
      "1",
      "--out",
      str(tmp_path),
    ],
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "tree_vs_ring.json").read_text())
  assert report["complete"]
  assert (tmp_path / "tree_vs_ring.png").stat().st_size > 0
  rows = {(r["method"], r["devices"], r["context"]): r for r in report["results"]}
  assert len(rows) == 2 * (1 + 2 * 2)
  for r in rows.values():
    assert r["max_abs_err_vs_single"] < 1e-5
    if r["method"] != "single_device":
      assert r["bytes_source"] == "hlo"
      assert r["hlo_bytes_per_device"] == r["formula_bytes_per_device"]
  assert report["goals"]["tree_bytes_constant_in_context"] == {"2": True, "4": True}
  assert (
    rows[("ring_kv", 4, 1024)]["hlo_bytes_per_device"]
    > rows[("ring_kv", 4, 512)]["hlo_bytes_per_device"]
  )
