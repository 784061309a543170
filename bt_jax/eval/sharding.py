"""Evaluation over the devices of one host: parameters placed by the training
rules (FSDP / tensor parallel, `bt_jax.axes.DEFAULT_RULES`), batches split
over the data-parallel axes, both as `bt_jax.mesh` places them for training.

    scorer = LoglikelihoodScorer(model, params, mesh=make_mesh((-1, 1, 1)))
    # or sharding=EvalSharding(make_mesh((-1, 1, 1)))

The binaries take `--mesh_shape` (`eval_sharding_from_flag`): "auto" (the
default) uses every local device on the data axis when there are several,
"none" one device, "D,F,T" a (data, fsdp, tensor) mesh. Scores equal the
single-device ones up to the order of float sums. One process only: a
multi-host evaluation would need each host to feed its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bt_jax import axes
from bt_jax import mesh as mesh_lib

# check_divisible: re-exported for callers of this module.
from bt_jax.mesh import (
  check_divisible,
  make_mesh,
  parse_mesh_shape,  # pylint: disable=unused-import
  with_logical_rules,
)


@dataclasses.dataclass(frozen=True)
class EvalSharding:
  """A mesh of this process's devices and the logical rules to place things by."""

  mesh: Mesh
  rules: tuple = axes.DEFAULT_RULES

  def __post_init__(self):
    if jax.process_count() > 1:
      raise ValueError(
        f"sharded evaluation runs in one process; this job has "
        f"{jax.process_count()} (run the evaluation on one host)"
      )
    missing = set(axes.MESH_AXES) - set(self.mesh.axis_names)
    if missing:
      raise ValueError(
        f"the evaluation mesh needs the axes {axes.MESH_AXES}; "
        f"{tuple(self.mesh.axis_names)} lacks {sorted(missing)}"
      )

  @property
  def data_parallel(self) -> int:
    """How many ways a batch is split; batch rows are rounded up to a multiple."""
    return mesh_lib.row_groups(self.mesh, self.rules)

  @property
  def batch(self) -> NamedSharding:
    """[batch, length] arrays: rows split over the data-parallel axes."""
    return NamedSharding(self.mesh, P(*mesh_lib.rows_spec(self.mesh, self.rules), None))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def rows(self, rows: int) -> int:
    """`rows` rounded up to a multiple of the data-parallel size."""
    return mesh_lib.round_rows(rows, self.mesh, self.rules)

  def param_shardings(self, model: nn.Module) -> Any:
    """NamedShardings of the model's parameters, from their logical axis names."""
    return mesh_lib.param_shardings(model, self.mesh, self.rules)

  def place_params(self, model: nn.Module, params: Any) -> Any:
    """params moved onto the mesh (a no-op for params already placed so)."""
    return mesh_lib.place_params(model, params, self.mesh, self.rules)

  def jit(self, fn: Callable, model: nn.Module, num_batch_args: int) -> Callable:
    """jit of fn(params, *batch_args) with params by the rules, the
    [batch, length] arguments split by rows, and replicated outputs."""
    return jax.jit(
      with_logical_rules(fn, self.mesh, self.rules),
      in_shardings=(self.param_shardings(model),) + (self.batch,) * num_batch_args,
      out_shardings=self.replicated,
    )


def eval_sharding_from_flag(value: str) -> Optional[EvalSharding]:
  """The binaries' --mesh_shape: "auto" | "none" | "D,F,T" (see the module doc)."""
  value = value.strip().lower()
  if value == "none":
    return None
  if value == "auto":
    if jax.local_device_count() == 1 or jax.process_count() > 1:
      return None
    return EvalSharding(make_mesh((-1, 1, 1), jax.local_devices()))
  return EvalSharding(make_mesh(parse_mesh_shape(value), jax.local_devices()))


def eval_sharding(
  mesh: Optional[Mesh] = None, sharding: Optional[EvalSharding] = None
) -> Optional[EvalSharding]:
  """The evaluators' `mesh=` (a (data, fsdp, tensor) mesh, as for training) or
  `sharding=`, as one EvalSharding (None: one device)."""
  if mesh is not None and sharding is not None:
    raise ValueError("give the evaluator a mesh or a sharding, not both")
  return sharding if mesh is None else EvalSharding(mesh)
