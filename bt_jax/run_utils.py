"""Pieces shared by the training binaries (`bt_jax.train`, `bt_jax.train_drafter`):
the metrics writer and the SIGTERM / Ctrl-C stop request."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def tensorboard_tag(key: str) -> str:
  """TensorBoard groups scalars by the part before '/': `train/...` and `eval/...`
  (metrics.jsonl keeps the flat keys)."""
  for prefix in ("eval_", "train_"):
    if key.startswith(prefix):
      return f"{prefix[:-1]}/{key[len(prefix) :]}"
  if key.startswith("heldout_"):
    return f"eval/{key}"
  return f"train/{key}"


class MetricWriter:
  """metrics.jsonl + TensorBoard (tensorboardX), written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    # Drop records past the restored step: they belong to the interrupted attempt.
    kept = []
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        for line in f:
          try:
            if json.loads(line)["step"] <= resume_step:
              kept.append(line if line.endswith("\n") else line + "\n")
          except (ValueError, KeyError, TypeError):
            continue
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._tb = SummaryWriter(os.path.join(workdir, TB_DIR))

  def write(self, record: dict[str, Any]) -> None:
    self.write_many([record])

  def write_many(self, records: list[dict[str, Any]]) -> None:
    """Appends records (one file open and one TensorBoard flush for all)."""
    if not self.enabled or not records:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.writelines(json.dumps(record) + "\n" for record in records)
    for record in records:
      step = record["step"]
      for key, value in record.items():
        if key == "step":
          continue
        tag = tensorboard_tag(key)
        if isinstance(value, list):
          for i, v in enumerate(value):
            self._tb.add_scalar(f"{tag}/{i}", v, step)
        else:
          self._tb.add_scalar(tag, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class StopRequest:
  """SIGTERM (preemption) or Ctrl-C (SIGINT) asks the loop to checkpoint and exit
  after the current step; a second Ctrl-C exits at once.

  Python runs signal handlers only between bytecodes of the main thread, so a
  signal that arrives while XLA compiles would wait for the compile. A watcher
  thread therefore reads the signals from `signal.set_wakeup_fd` as they
  arrive: a second SIGINT ends the process at once (status 130), and with
  `exit_before_ready` any stop signal before `ready()` (start-up, restore, the
  first compile: nothing since the last checkpoint to save) ends it within a
  moment with status 0.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, *, exit_before_ready: bool = False):
    self.requested = threading.Event()
    self._ready = threading.Event()
    self._exit_before_ready = exit_before_ready
    self._previous = {}
    self._previous_fd = None
    self._pipe = None
    self._watcher = None
    self._interrupts = 0

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._pipe = (read_fd, write_fd)
    self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, name="stop-request-watcher", daemon=True)
    self._watcher.start()
    return self

  def ready(self) -> None:
    """The loop is stepping: from now on a stop signal checkpoints before exiting."""
    self._ready.set()

  def _handle(self, signum, frame):
    del signum, frame
    self.requested.set()

  def _watch(self) -> None:
    read_fd = self._pipe[0]
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum == signal.SIGINT:
          self._interrupts += 1
        if signum not in self.SIGNALS:
          continue
        if self._interrupts >= 2:
          os.write(2, b"\nsecond interrupt: exiting now; the last saved checkpoint is kept\n")
          os._exit(130)  # pylint: disable=protected-access
        if self._exit_before_ready and not self._ready.is_set():
          os.write(2, b"\nstop requested before the first step: nothing new to save; exiting\n")
          os._exit(0)  # pylint: disable=protected-access

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
      read_fd, write_fd = self._pipe
      os.close(write_fd)  # the watcher reads end-of-file and returns
      self._watcher.join(timeout=5)
      os.close(read_fd)
      self._pipe = None

  def should_stop(self, step: int, sync_point: bool) -> bool:
    """Whether to checkpoint and exit after `step`: the same answer on every host.

    With several hosts, a local SIGTERM is shared only at `sync_point` steps
    (those the loop already waits for: logged, evaluated or checkpointed), so
    the other steps keep dispatching asynchronously.
    """
    if jax.process_count() == 1:
      return self.requested.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    try:  # the preemption notice of TPU / cloud schedulers, when the service runs
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except Exception:  # pylint: disable=broad-except  (no preemption service)
      pass
    if not sync_point:
      return False
    # A SIGTERM that reached any one host stops them all, at the same step.
    local = np.int32(self.requested.is_set())
    return bool(np.any(multihost_utils.process_allgather(local)))
