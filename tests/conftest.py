"""Suite-wide pytest settings.

`slow` marks what starts binaries, subprocesses or multi-device checks;
`python -m pytest -q -m "not slow" tests` is the inner loop. A multi-device
check (marker `multidevice`, 8 forced CPU devices in its own process) is always
slow.
"""

import pytest


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.get_closest_marker("multidevice") is not None:
      item.add_marker(pytest.mark.slow)
