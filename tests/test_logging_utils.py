"""The binaries' orbax log filter: drops chatter, keeps real warnings."""

from __future__ import annotations

import logging

from bt_jax import logging_utils


def _record(path: str, level: int, message: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, message, None, None)


def test_orbax_filter_keeps_unexpected_warnings():
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  keep = logging_utils._QuietOrbax().filter  # pylint: disable=protected-access
  assert not keep(_record(orbax, logging.INFO, "Finished loading checkpoint"))
  assert not keep(_record(orbax, logging.WARNING, "Given directory is read only=/x"))
  assert not keep(
    _record(
      orbax,
      logging.WARNING,
      "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
    )
  )
  assert keep(_record(orbax, logging.WARNING, "Step 7 could not be restored"))
  assert keep(_record(orbax, logging.ERROR, "Given directory is read only, and broken"))
  assert keep(_record("/work/bt_jax/train.py", logging.INFO, "step 3"))
