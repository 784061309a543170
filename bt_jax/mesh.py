"""Device meshes for training and evaluation (data, fsdp, tensor axes).

`make_mesh((-1, 1, 1))` puts every device on the data axis; the logical axis
rules of `bt_jax.axes.DEFAULT_RULES` map parameters and activations onto it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax

from bt_jax import axes


def make_mesh(mesh_shape: Sequence[int], devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes; one size may be -1 (the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(mesh_shape)
  if len(shape) != len(axes.MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} must be {len(axes.MESH_AXES)} sizes for the axes "
                     f"{axes.MESH_AXES}, each positive or one of them -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} (axes {axes.MESH_AXES}) needs "
                     f"{math.prod(shape)} devices but there are {len(devices)}; use -1 for one axis "
                     "to take the remaining devices")
  return jax.make_mesh(tuple(shape), axes.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)


def parse_mesh_shape(text: str) -> tuple[int, ...]:
  """"-1,1,1" -> (-1, 1, 1), for command-line flags; errors name the text."""
  try:
    shape = tuple(int(part) for part in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != len(axes.MESH_AXES):
    raise ValueError(f"mesh_shape {text!r} must be {len(axes.MESH_AXES)} comma-separated ints "
                     f"for the axes {axes.MESH_AXES}, e.g. -1,1,1")
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
