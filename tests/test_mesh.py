"""bt_jax.mesh: one home for meshes and parameter placement.

The same `mesh=` means the same thing, with the same error, in `generate`,
`speculative_generate` and the evaluators (checked on 4 forced CPU devices in
a subprocess: no compile, the error comes before any)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from bt_jax import axes, distributed, mesh as mesh_lib
from bt_jax.eval.sharding import EvalSharding
from bt_jax.models import abstract_params, build_model
from tests.multidevice import REPO
from tests.utils import tiny_config


def test_meshes_live_in_one_module():
  assert distributed.make_sequence_mesh is mesh_lib.make_sequence_mesh
  assert distributed.make_two_level_mesh is mesh_lib.make_two_level_mesh
  one = mesh_lib.make_sequence_mesh(1)
  assert one.axis_names == ("sequence",) and mesh_lib.row_groups(one) == 1
  assert mesh_lib.rows_spec(one) == P() and not mesh_lib.is_model_mesh(one)
  model_mesh = mesh_lib.make_mesh((1, 1, 1))
  assert mesh_lib.is_model_mesh(model_mesh)
  assert mesh_lib.rows_spec(model_mesh) == P(("data", "fsdp"))
  assert mesh_lib.row_groups(None) == 1 and mesh_lib.round_rows(5, model_mesh) == 5


def test_param_shardings_are_the_training_rules():
  model = build_model(tiny_config("vanilla", num_layers=1, width=32, vocab_size=64, max_len=16))
  mesh = mesh_lib.make_mesh((1, 1, 1))
  shardings = mesh_lib.param_shardings(model, mesh)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  want = nn.logical_to_mesh_sharding(
    nn.get_partition_spec(abstract_params(model, unbox=False)), mesh, axes.DEFAULT_RULES
  )
  assert shardings == want
  assert EvalSharding(mesh).param_shardings(model) == want
  assert mesh_lib.check_params_fit(model, mesh) == want
  assert mesh_lib.check_params_fit(model, mesh_lib.make_sequence_mesh(1)) is None
  assert mesh_lib.check_params_fit(model, None) is None


_SCRIPT = r"""
import json, jax
from bt_jax.eval.scoring import LoglikelihoodScorer
from bt_jax.inference import generate
from bt_jax.mesh import make_mesh
from bt_jax.models import abstract_params, build_model
from bt_jax.redrafter import DraftHead, DrafterConfig, speculative_generate
from tests.utils import tiny_config

config = tiny_config("vanilla", num_layers=1, width=32, head_dim=16, vocab_size=128, max_len=64)
model = build_model(config)
params = abstract_params(model)          # shapes only: the error comes before any compile
wide = make_mesh((1, 1, 4))              # 2 heads cannot be split 4 ways
errors = {}
calls = {
    "generate": lambda: generate(model, params, [[1, 2, 3]], max_new_tokens=4, mesh=wide),
    "speculative_generate": lambda: speculative_generate(
        model, params, DraftHead(DrafterConfig.for_base(config, draft_len=2)), None, [[1, 2, 3]],
        max_new_tokens=4, mesh=wide),
    "LoglikelihoodScorer": lambda: LoglikelihoodScorer(model, params, mesh=wide),
}
for name, call in calls.items():
  try:
    call()
    errors[name] = None
  except ValueError as e:
    errors[name] = str(e)
print(json.dumps(errors))
"""


@pytest.mark.slow
def test_the_same_mesh_error_from_generate_speculative_and_eval():
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
  )
  result = subprocess.run(
    [sys.executable, "-c", _SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  errors = json.loads(result.stdout.strip().splitlines()[-1])
  messages = set(errors.values())
  assert len(messages) == 1, errors
  message = messages.pop()
  assert message is not None and message.startswith("parameter ["), message
  assert "cannot be split 4 ways over the mesh axes ('tensor',)" in message, message
