"""Shared pieces of the sweep tests: a tiny run (a few steps of a 1 x 64 block model)."""

from __future__ import annotations

import pytest

from tests.utils import TINY_RUN_GIN  # the tiny run the train tests use too


@pytest.fixture(scope="session")
def tiny_run_gin(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("sweep_gin") / "tiny_run.gin"
  path.write_text(TINY_RUN_GIN)
  return str(path)
