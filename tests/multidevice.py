"""Shared by the multi-device check scripts and their pytest wrappers.

A script (run in its own process with 8 forced CPU devices; never imported by
pytest) records named checks with `record` / `check` and ends with
`summary()`, which prints one JSON line per check and a summary line and
returns the exit status. The pytest side runs it with `run_check_script`,
which fails with the failed checks and the stderr tail.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS: list[dict] = []
_STARTED = time.time()


def record(name: str, ok: bool, detail="") -> None:
  RESULTS.append(dict(name=name, ok=bool(ok), detail=str(detail)))
  print(json.dumps(RESULTS[-1]), flush=True)


def check(name: str, fn: Callable[[], None]) -> None:
  """Runs fn; an exception is recorded as a failed check, so that one failure
  does not hide the others."""
  try:
    fn()
  except Exception:  # pylint: disable=broad-except
    record(name, False, traceback.format_exc()[-3000:])


def summary() -> int:
  """Prints the summary line; the exit status (1 if any check failed)."""
  failed = [r["name"] for r in RESULTS if not r["ok"]]
  print(
    json.dumps(
      dict(
        summary=True, checks=len(RESULTS), failed=failed, seconds=round(time.time() - _STARTED, 1)
      )
    ),
    flush=True,
  )
  return 1 if failed else 0


# XLA's word for a resharding it could only do by replicating the array
# first: a sharding bug (e.g. the embedding lookup before bt_jax.layers.Embed).
SHARDING_WARNINGS = ("Involuntary full rematerialization",)


def run_check_script(
  script: str,
  *,
  checks: Optional[int] = None,
  min_checks: Optional[int] = None,
  timeout: int = 900,
  devices: int = 8,
) -> list[dict]:
  """Runs tests/<script> with `devices` forced CPU devices and asserts that it
  passed every check and ran `checks` (or at least `min_checks`) of them, so
  that none was skipped silently, and that XLA printed none of
  SHARDING_WARNINGS. Returns the check records."""
  import pytest  # pylint: disable=import-outside-toplevel

  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  try:
    result = subprocess.run(
      [sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{script} timed out after {timeout} s; output so far:\n{e.stdout}\n{e.stderr}")
  lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
  failed = [l for l in lines if not l.get("ok", True)]
  found = [l for l in lines if l.get("summary")]
  assert result.returncode == 0 and found and not failed, (
    f"rc={result.returncode}\nfailed: {json.dumps(failed, indent=1)}\n"
    f"stderr tail:\n{result.stderr[-3000:]}"
  )
  warned = [w for w in SHARDING_WARNINGS if w in result.stderr]
  assert not warned, f"XLA warned {warned}:\n{result.stderr[-3000:]}"
  ran = found[0]["checks"]
  if checks is not None:
    assert ran == checks, (ran, lines)
  if min_checks is not None:
    assert ran >= min_checks, (ran, lines)
  return [l for l in lines if not l.get("summary")]
