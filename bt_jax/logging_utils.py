"""Logging set-up shared by the binaries."""

from __future__ import annotations

import logging


# Warnings orbax gives on every read-only restore (the inference and eval
# binaries open the checkpoints read-only on purpose): nothing to act on.
_EXPECTED_ORBAX_WARNINGS = (
  "read_only=True, setting save_interval_steps=0",
  "Given directory is read only",
)


class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO chatter (per save / restore) and the two warnings of a
  read-only restore; its other warnings still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    if record.levelno > logging.WARNING:
      return True
    message = record.getMessage()
    return not any(expected in message for expected in _EXPECTED_ORBAX_WARNINGS)


def quiet_orbax_logs() -> None:
  """For binaries: keeps orbax's INFO lines out of the absl log (idempotent)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())
