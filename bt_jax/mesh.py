"""Device meshes and parameter placement: the one home for both (MaxText's
`sharding` habit), used by training, checkpoint loading, evaluation and
speculative decoding.

Two kinds of mesh:

  model meshes      (data, fsdp, tensor): `make_mesh((-1, 1, 1))` puts every
                    device on the data axis. Parameters are placed by their
                    logical axis names and the rules of `bt_jax.axes.DEFAULT_RULES`
                    (`param_shardings`; a mesh axis that does not divide the
                    dim it splits is an error naming the parameter,
                    `check_divisible`), rows split over the data-parallel axes
                    data x fsdp (`rows_spec`, `row_groups`).
  sequence meshes   `sequence` (and optionally `data`): `make_sequence_mesh(p)`
                    splits a KV cache over p devices for decoding (Tree
                    Attention, docs/tree_attention.md); `make_two_level_mesh`
                    a (node, local) grid. Parameters are replicated; rows split
                    over `data`.

Every caller that takes `mesh=` (training, `generate`, `speculative_generate`,
the evaluators) pads or rounds its rows to `row_groups(mesh)` and checks the
parameters with `check_params_fit` before anything is compiled.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from bt_jax import axes
from bt_jax.config import round_up


def make_mesh(
  mesh_shape: Sequence[int], devices: Optional[Sequence[Any]] = None
) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes; one size may be -1 (the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(mesh_shape)
  if (
    len(shape) != len(axes.MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1
  ):
    raise ValueError(
      f"mesh_shape {tuple(mesh_shape)} must be {len(axes.MESH_AXES)} sizes for the axes "
      f"{axes.MESH_AXES}, each positive or one of them -1"
    )
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh_shape {tuple(mesh_shape)} (axes {axes.MESH_AXES}) needs "
      f"{math.prod(shape)} devices but there are {len(devices)}; use -1 for one axis "
      "to take the remaining devices"
    )
  return jax.make_mesh(
    tuple(shape),
    axes.MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
    devices=devices,
  )


def parse_mesh_shape(text: str) -> tuple[int, ...]:
  """ "-1,1,1" -> (-1, 1, 1), for command-line flags; errors name the text."""
  try:
    shape = tuple(int(part) for part in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != len(axes.MESH_AXES):
    raise ValueError(
      f"mesh_shape {text!r} must be {len(axes.MESH_AXES)} comma-separated ints "
      f"for the axes {axes.MESH_AXES}, e.g. -1,1,1"
    )
  return shape


def batch_axes(rules) -> Any:
  """The mesh axis (or axes) the batch is split over under `rules`."""
  return dict(rules).get(axes.BATCH)


def data_parallel_size(mesh: jax.sharding.Mesh, rules) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  names = batch_axes(rules)
  if names is None:
    return 1
  names = (names,) if isinstance(names, str) else names
  return math.prod(mesh.shape[a] for a in names)


def with_logical_rules(fn: Callable, mesh: jax.sharding.Mesh, rules) -> Callable:
  """fn traced with the mesh and the logical axis rules active, so the models'
  `nn.with_logical_constraint` calls shard the activations (wrap before jit)."""

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return wrapped


def make_sequence_mesh(
  num_devices: Optional[int] = None,
  *,
  devices: Optional[Sequence[jax.Device]] = None,
  axis_name: str = "sequence",
  data_devices: int = 1,
) -> Mesh:
  """1-D mesh of the first `num_devices` devices (all by default), Auto axes.

  data_devices > 1: a 2-D (data, sequence) mesh of data_devices x num_devices
  devices (num_devices default: all of them // data_devices); sharded
  generation then splits the rows over `data` and each row group's cache over
  `sequence`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data_devices < 1 or len(devices) < data_devices:
    raise ValueError(f"data_devices must be in [1, {len(devices)}]; got {data_devices}")
  if num_devices is None:
    num_devices = len(devices) // data_devices
  if not 1 <= num_devices * data_devices <= len(devices):
    raise ValueError(
      f"num_devices must be in [1, {len(devices) // data_devices}] "
      f"(x data_devices={data_devices} <= {len(devices)} devices); "
      f"got {num_devices}"
    )
  if data_devices == 1:
    return Mesh(np.array(devices[:num_devices]), (axis_name,), axis_types=(AxisType.Auto,))
  grid = np.array(devices[: data_devices * num_devices]).reshape(data_devices, num_devices)
  return Mesh(grid, ("data", axis_name), axis_types=(AxisType.Auto,) * 2)


def make_two_level_mesh(
  num_nodes: int,
  devices_per_node: int,
  *,
  devices: Optional[Sequence[jax.Device]] = None,
  node_axis: str = "node",
  local_axis: str = "local",
) -> Mesh:
  """(node, local) mesh; devices_per_node consecutive devices form a node."""
  devices = list(jax.devices() if devices is None else devices)
  needed = num_nodes * devices_per_node
  if needed > len(devices):
    raise ValueError(
      f"a {num_nodes}x{devices_per_node} mesh needs {needed} devices; only {len(devices)} available"
    )
  grid = np.array(devices[:needed]).reshape(num_nodes, devices_per_node)
  return Mesh(grid, (node_axis, local_axis), axis_types=(AxisType.Auto,) * 2)


# ---------------------------------------------------------------------------
# Placement by the logical axis rules


def is_model_mesh(mesh: Optional[Mesh]) -> bool:
  """A (data, fsdp, tensor) mesh: parameters placed by the logical axis rules."""
  return mesh is not None and set(axes.MESH_AXES) <= set(mesh.axis_names)


def logical_shardings(boxed: Any, mesh: Mesh, rules=axes.DEFAULT_RULES) -> Any:
  """NamedShardings of a tree boxed with logical axis names (parameters, and
  the optimizer state that mirrors them) under `rules`."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, tuple(rules))


@functools.lru_cache(maxsize=16)
def _param_shardings(model: nn.Module, mesh: Mesh, rules: tuple) -> Any:
  from bt_jax.models import abstract_params  # pylint: disable=import-outside-toplevel

  return logical_shardings(abstract_params(model, unbox=False), mesh, rules)


def param_shardings(model: nn.Module, mesh: Mesh, rules=axes.DEFAULT_RULES) -> Any:
  """NamedShardings of the model's parameters, from their logical axis names."""
  return _param_shardings(model, mesh, tuple(rules))


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
          f"{dict(sharding.mesh.shape)}; choose a mesh_shape whose axes divide it"
        )

  jax.tree_util.tree_map_with_path(check, params, shardings)


def check_params_fit(
  model: nn.Module, mesh: Optional[Mesh], params: Any = None, rules=axes.DEFAULT_RULES
) -> Optional[Any]:
  """On a model mesh: the parameter shardings, after checking that every mesh
  axis divides the dims it splits (of `params`, or of the model's abstract
  parameters). None for no mesh or a sequence mesh (parameters replicated)."""
  if not is_model_mesh(mesh):
    return None
  shardings = param_shardings(model, mesh, rules)
  if params is None:
    from bt_jax.models import abstract_params  # pylint: disable=import-outside-toplevel

    params = abstract_params(model)
  check_divisible(params, shardings)
  return shardings


def place_params(model: nn.Module, params: Any, mesh: Mesh, rules=axes.DEFAULT_RULES) -> Any:
  """params moved onto a model mesh by the rules (a no-op for params already so)."""
  shardings = param_shardings(model, mesh, rules)
  check_divisible(params, shardings)
  return jax.device_put(params, shardings)


def rows_spec(mesh: Mesh, rules=axes.DEFAULT_RULES) -> P:
  """How per-row ([batch, ...]) arrays are split: over the data-parallel axes
  of the rules (data x fsdp) on a model mesh, over `data` on another mesh that
  has one, else not at all."""
  if is_model_mesh(mesh):
    return P(batch_axes(rules))
  return P(axes.MESH_DATA) if axes.MESH_DATA in mesh.axis_names else P()


def row_groups(mesh: Optional[Mesh], rules=axes.DEFAULT_RULES) -> int:
  """How many ways `rows_spec` splits the rows: batches are padded (generate,
  speculative_generate) or rounded up (evaluators) to a multiple of it."""
  if mesh is None:
    return 1
  if is_model_mesh(mesh):
    return data_parallel_size(mesh, rules)
  return dict(mesh.shape).get(axes.MESH_DATA, 1)


def round_rows(rows: int, mesh: Optional[Mesh], rules=axes.DEFAULT_RULES) -> int:
  """`rows` rounded up to a multiple of `row_groups(mesh)`."""
  return round_up(rows, row_groups(mesh, rules))
