"""Evaluation over a device mesh (bt_jax.eval.sharding).

The 8-device checks run in their own process (multidevice_eval.py): the
forced-device flag must never be set in the pytest process.
"""

from __future__ import annotations

import jax
import pytest

from bt_jax.eval.sharding import EvalSharding, eval_sharding_from_flag
from bt_jax.mesh import make_mesh, parse_mesh_shape
from tests.multidevice import run_check_script


def test_one_device_flags_and_errors():
  assert eval_sharding_from_flag("auto") is None  # one CPU device here
  assert eval_sharding_from_flag("none") is None
  single = eval_sharding_from_flag("1,1,1")
  assert single.data_parallel == 1 and single.rows(5) == 5
  with pytest.raises(ValueError, match=r"mesh_shape '4' must be 3 comma-separated ints"):
    parse_mesh_shape("4")
  with pytest.raises(ValueError, match=r"mesh_shape \(0, 1, 1\) must be 3 sizes"):
    make_mesh((0, 1, 1))
  mesh = jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match=r"lacks \['data', 'fsdp', 'tensor'\]"):
    EvalSharding(mesh)


@pytest.mark.multidevice
def test_sharded_eval_matches_one_device_on_8_devices():
  """Vanilla and Block (L_B = 4) on meshes 8x1x1, 2x2x2 and 1x4x2: the same
  log-likelihoods, greedy flags and perplexity as one device, parameters
  really split when fsdp x tensor > 1; the --mesh_shape flag and its errors."""
  run_check_script("tests/eval/multidevice_eval.py", checks=7)
