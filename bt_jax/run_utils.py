"""Pieces shared by the training binaries (`bt_jax.train`, `bt_jax.train_drafter`):
the metrics writer and the SIGTERM / preemption stop request."""

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
        if isinstance(value, list):
          for i, v in enumerate(value):
            self._tb.add_scalar(f"{key}/{i}", v, step)
        else:
          self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class StopRequest:
  """SIGTERM (preemption) asks the loop to checkpoint and exit after the current step."""

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested.set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

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
