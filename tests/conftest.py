"""Suite-wide pytest settings.

`slow` marks what starts binaries, subprocesses or multi-device checks, and the
in-process tests listed in `tests/heavy.txt` (each measured at several seconds
on 2 CPU cores: mostly compiles of many model variants; one representative of
each family stays in the inner loop); `python -m pytest -q -m "not slow" tests`
is the inner loop. A multi-device check (marker `multidevice`, 8 forced CPU
devices in its own process) is always slow.

JAX's persistent compilation cache is on for the suite's own process
(`.pytest_cache/jax_compilation_cache` under the repository root), so a second
run of the inner loop skips most XLA compiles; `BT_JAX_TEST_COMPILE_CACHE=0`
turns it off, another value names the folder. Subprocesses (binaries,
multi-device checks) do not inherit it.
"""

import os
import pathlib

import jax
import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
  del config
  folder = os.environ.get(
    "BT_JAX_TEST_COMPILE_CACHE", str(_REPO / ".pytest_cache" / "jax_compilation_cache")
  )
  if folder != "0":
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _heavy_tests() -> set[str]:
  path = _REPO / "tests" / "heavy.txt"
  lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
  return {line for line in lines if line}


def pytest_collection_modifyitems(config, items):
  del config
  heavy = _heavy_tests()
  for item in items:
    listed = item.nodeid in heavy or item.nodeid.split("[")[0] in heavy  # a bare name: every case
    if item.get_closest_marker("multidevice") is not None or listed:
      item.add_marker(pytest.mark.slow)
