"""Running a binary in a subprocess and stopping it with SIGTERM (the tests
of the training binaries' preemption handling)."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def sigterm_when(
  args: list[str], ready: Callable[[], bool], *, cwd, env, wait: float = 240, settle: float = 0.0
) -> tuple[int, str, str]:
  """Starts `args`, polls `ready()` until it holds (for at most `wait`
  seconds), waits `settle` seconds more, sends SIGTERM and returns
  (returncode, stdout, stderr). Fails with the stderr tail if the process
  ended before it was signalled; never leaves it running."""
  proc = subprocess.Popen(
    args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    deadline = time.time() + wait
    while time.time() < deadline and proc.poll() is None and not ready():
      time.sleep(0.2)
    time.sleep(settle)
    assert proc.poll() is None, proc.stderr.read()[-4000:]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, stdout, stderr
