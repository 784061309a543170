"""Checkpoints of a training run, and loading a trained model for inference.

A workdir written by `python -m bt_jax.train`:

    DIR/config.gin              the operative gin config of the run
    DIR/model_config.json       the model config the run trained ({"kind", "config"})
    DIR/tokenizer.json          the run's tokenizer
    DIR/checkpoints/<step>/     orbax CheckpointManager steps, each with three items:
        params/                 the model parameters (f32 master weights)
        train_state/            {"step", "opt_state"}
        data/                   the grain iterator position, one JSON file per process
    DIR/metrics.jsonl, DIR/summary.json, DIR/tb/   (see bt_jax.train)

Saves are orbax's (atomic: a step directory appears only when complete);
`CheckpointManager` keeps the last `keep` steps.

    model, params, tokenizer = load_for_inference("DIR")          # latest step
    model, params, tokenizer = load_for_inference("DIR", step=500)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from bt_jax import axes
from bt_jax import config as config_lib
from bt_jax import mesh as mesh_lib
from bt_jax.data.tokenizer import Tokenizer

CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
PARAMS = "params"
TRAIN_STATE = "train_state"
DATA = "data"

_CONFIG_CLASSES = {"vanilla": config_lib.VanillaConfig, "block": config_lib.BlockConfig}


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


class Checkpointer:
  """An orbax `CheckpointManager` over DIR/checkpoints holding params, train state and data state.

  save() is asynchronous for the arrays (orbax copies them to host first); the
  data iterator's state is written before save() returns, so the iterator can
  advance right away. Call wait() before reading a checkpoint back and close()
  at the end.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    keep: Optional[int] = None,
    async_save: bool = True,
    read_only: bool = False,
  ):
    if keep is not None and keep <= 0:
      raise ValueError(f"keep={keep} must be a positive number of checkpoints (or None: keep all)")
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params: Any, train_state: Any, data_iterator=None) -> None:
    items = {PARAMS: ocp.args.StandardSave(params), TRAIN_STATE: ocp.args.StandardSave(train_state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(
    self, step: int, abstract_params: Any, abstract_train_state: Any = None, data_iterator=None
  ):
    """Restores onto the shardings of the abstract trees (ShapeDtypeStructs with .sharding).

    Returns (params, train_state or None); `data_iterator` is set to the saved
    position in place.
    """
    items = {PARAMS: ocp.args.StandardRestore(abstract_params)}
    if abstract_train_state is not None:
      items[TRAIN_STATE] = ocp.args.StandardRestore(abstract_train_state)
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[PARAMS], restored[TRAIN_STATE] if abstract_train_state is not None else None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def model_config_to_json(model_config: config_lib.ModelConfig) -> str:
  fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}
  return json.dumps({"kind": model_config.kind, "config": fields}, indent=2, sort_keys=True)


def model_config_from_json(text: str, source: str = "<string>") -> config_lib.ModelConfig:
  try:
    record = json.loads(text)
    cls = _CONFIG_CLASSES[record["kind"]]
    return cls(**record["config"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{source} is not a model config written by bt_jax.train: {e}") from e


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes a small file so that a reader never sees half of it."""
  path = os.fspath(path)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def save_model_config(workdir: str | os.PathLike, model_config: config_lib.ModelConfig) -> None:
  write_text_atomic(
    os.path.join(os.fspath(workdir), MODEL_CONFIG_FILE), model_config_to_json(model_config)
  )


def load_model_config(workdir: str | os.PathLike) -> config_lib.ModelConfig:
  path = os.path.join(os.fspath(workdir), MODEL_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"workdir {os.fspath(workdir)!r} has no {MODEL_CONFIG_FILE}; expected a directory written by "
      "`python -m bt_jax.train --workdir=...`"
    )
  with open(path, encoding="utf-8") as f:
    return model_config_from_json(f.read(), path)


def load_for_inference(
  workdir: str | os.PathLike, step: Optional[int] = None, *, sharding: Any = None
):
  """(model, params, tokenizer) from a training workdir: the latest (or the given) step.

  Reads DIR/model_config.json, DIR/tokenizer.json and only the `params` item of
  the checkpoint (no optimizer state, no data state). Params keep the dtype they
  were trained with (f32 master weights) and are restored straight onto
  `sharding`: one Sharding for every leaf (default: the first local device), a
  pytree of them, a (data, fsdp, tensor) `jax.sharding.Mesh` or anything with a
  `.mesh` and `.rules` (`bt_jax.eval.sharding.EvalSharding`): each parameter
  placed on the mesh by the training rules (`bt_jax.mesh.check_params_fit`), so
  no device holds the whole model unless the rules replicate it. The model's
  compute dtype is the one trained with; make a variant with `build_model(dataclasses.replace(model.config, dtype=...))`.
  Raises FileNotFoundError naming the workdir when something is missing.
  """
  from bt_jax.models import abstract_params, build_model  # pylint: disable=g-import-not-at-top

  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  model_config = load_model_config(workdir)
  tokenizer_path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"workdir {workdir!r} has no {TOKENIZER_FILE}")
  tokenizer = Tokenizer.from_file(tokenizer_path)
  ckpt_dir = checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
      f"workdir {workdir!r} has no checkpoints: expected step directories under {ckpt_dir!r}"
    )
  checkpointer = Checkpointer(workdir, read_only=True, async_save=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"workdir {workdir!r} has no checkpoints: expected step directories under {ckpt_dir!r}"
      )
    if step is not None and step not in steps:
      raise FileNotFoundError(
        f"workdir {workdir!r} has no checkpoint for step {step}; saved steps: {sorted(steps)}"
      )
    model = build_model(model_config)
    abstract = abstract_params(model)
    if isinstance(sharding, jax.sharding.Mesh) or hasattr(sharding, "rules"):  # by the rules
      mesh, rules = (
        (sharding, axes.DEFAULT_RULES)
        if isinstance(sharding, jax.sharding.Mesh)
        else (sharding.mesh, sharding.rules)
      )
      if not mesh_lib.is_model_mesh(mesh):
        raise ValueError(
          f"parameters are placed on a (data, fsdp, tensor) mesh "
          f"(bt_jax.mesh.make_mesh); the mesh has axes {dict(mesh.shape)}"
        )
      shardings = mesh_lib.check_params_fit(model, mesh, abstract, rules)
    elif sharding is None or isinstance(sharding, jax.sharding.Sharding):
      one = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: one, abstract)
    else:  # a pytree of shardings
      shardings = sharding
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    from bt_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    # The newest step that restores cleanly (a damaged one is named in one log
    # line and moved to checkpoints_damaged/); an asked-for damaged step is an
    # error naming the newest good one.
    _, (params, _) = workdir_lib.restore_newest_good(
      ckpt_dir, steps, lambda s: checkpointer.restore(s, target), step=step
    )
  finally:
    checkpointer.close()
  return model, params, tokenizer
