"""Suite-wide pytest settings.

`slow` marks what starts binaries, subprocesses or multi-device checks;
`python -m pytest -q -m "not slow" tests` is the inner loop. A multi-device
check (marker `multidevice`, 8 forced CPU devices in its own process) is always
slow.

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
  folder = os.environ.get("BT_JAX_TEST_COMPILE_CACHE",
                          str(_REPO / ".pytest_cache" / "jax_compilation_cache"))
  if folder != "0":
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.get_closest_marker("multidevice") is not None:
      item.add_marker(pytest.mark.slow)
