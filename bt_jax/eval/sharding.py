"""Evaluation over the devices of one host: parameters placed by the training
rules (FSDP / tensor parallel, `bt_jax.axes.DEFAULT_RULES`), batches split
over the data-parallel axes.

    sharding = EvalSharding(make_mesh((-1, 1, 1)))   # every device data-parallel
    scorer = LoglikelihoodScorer(model, params, sharding=sharding)

The binaries take `--mesh_shape` (`eval_sharding_from_flag`): "auto" (the
default) uses every local device on the data axis when there are several,
"none" one device, "D,F,T" a (data, fsdp, tensor) mesh. Scores equal the
single-device ones up to the order of float sums. One process only: a
multi-host evaluation would need each host to feed its own rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bt_jax import axes
from bt_jax.mesh import (batch_axes, data_parallel_size, make_mesh, parse_mesh_shape,
                         with_logical_rules)


@dataclasses.dataclass(frozen=True)
class EvalSharding:
  """A mesh of this process's devices and the logical rules to place things by."""

  mesh: Mesh
  rules: tuple = axes.DEFAULT_RULES

  def __post_init__(self):
    if jax.process_count() > 1:
      raise ValueError(f"sharded evaluation runs in one process; this job has "
                       f"{jax.process_count()} (run the evaluation on one host)")
    missing = set(axes.MESH_AXES) - set(self.mesh.axis_names)
    if missing:
      raise ValueError(f"the evaluation mesh needs the axes {axes.MESH_AXES}; "
                       f"{tuple(self.mesh.axis_names)} lacks {sorted(missing)}")

  @property
  def data_parallel(self) -> int:
    """How many ways a batch is split; batch rows are rounded up to a multiple."""
    return data_parallel_size(self.mesh, self.rules)

  @property
  def batch(self) -> NamedSharding:
    """[batch, length] arrays: rows split over the data-parallel axes."""
    return NamedSharding(self.mesh, P(batch_axes(self.rules), None))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def rows(self, rows: int) -> int:
    """`rows` rounded up to a multiple of the data-parallel size."""
    return -(-rows // self.data_parallel) * self.data_parallel

  def param_shardings(self, model: nn.Module) -> Any:
    """NamedShardings of the model's parameters, from their logical axis names."""
    return _param_shardings(model, self.mesh, self.rules)

  def place_params(self, model: nn.Module, params: Any) -> Any:
    """params moved onto the mesh (a no-op for params already placed so)."""
    shardings = self.param_shardings(model)
    check_divisible(params, shardings)
    return jax.device_put(params, shardings)

  def jit(self, fn: Callable, model: nn.Module, num_batch_args: int) -> Callable:
    """jit of fn(params, *batch_args) with params by the rules, the
    [batch, length] arguments split by rows, and replicated outputs."""
    return jax.jit(with_logical_rules(fn, self.mesh, self.rules),
                   in_shardings=(self.param_shardings(model),) + (self.batch,) * num_batch_args,
                   out_shardings=self.replicated)


@functools.lru_cache(maxsize=16)
def _param_shardings(model: nn.Module, mesh: Mesh, rules: tuple) -> Any:
  from bt_jax.models import abstract_params  # pylint: disable=import-outside-toplevel
  specs = nn.get_partition_spec(abstract_params(model, unbox=False))
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(params: Any, shardings: Any) -> None:
  """A clear error when a mesh axis does not divide the parameter dim it splits."""
  def check(path, x, sharding):
    for dim, (size, names) in enumerate(zip(x.shape, sharding.spec)):
      names = (names,) if isinstance(names, str) else (names or ())
      ways = 1
      for name in names:
        ways *= sharding.mesh.shape[name]
      if size % ways:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} of shape {tuple(x.shape)}: dim {dim} "
            f"({size}) cannot be split {ways} ways over the mesh axes {names} of "
            f"{dict(sharding.mesh.shape)}; choose a mesh_shape whose axes divide it")
  jax.tree_util.tree_map_with_path(check, params, shardings)


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
