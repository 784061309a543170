"""Logging set-up shared by the binaries."""

from __future__ import annotations

import logging


class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO chatter (per save / restore); its warnings still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """For binaries: keeps orbax's INFO lines out of the absl log (idempotent)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())
