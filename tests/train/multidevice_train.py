"""Trains the tiny test config on 8 forced CPU devices with mesh (data=2, fsdp=2, tensor=2).

Run in its own process by test_train.py (never import it from pytest):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/train/multidevice_train.py RUN_GIN WORKDIR
Prints one JSON line: the run's summary, and how the parameters, optimizer
state and batches were placed.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from bt_jax import axes
from bt_jax import train
from bt_jax import trainer
from bt_jax.mesh import make_mesh
from bt_jax.models import build_model


def _sharded_leaves(tree) -> tuple[int, int]:
  """(leaves split over more than one device, all leaves) of a tree of shardings."""
  leaves = jax.tree.leaves(tree)
  return sum(1 for s in leaves if not s.is_fully_replicated), len(leaves)


def main(run_gin: str, workdir: str) -> None:
  assert jax.device_count() == 8, f"expected 8 forced CPU devices, got {jax.device_count()}"
  model_config, cfg, operative = train.configs_from_gin([run_gin], ["train.mesh_shape = (2, 2, 2)"])
  summary = train.train_and_evaluate(workdir, model_config, cfg, operative_config=operative)
  model = build_model(train.resolve_model_config(model_config, cfg))
  mesh = make_mesh(cfg.mesh_shape)
  fns = trainer.step_functions(model, mesh, tuple(axes.DEFAULT_RULES))
  params_split, params_all = _sharded_leaves(fns.state_shardings["params"])
  opt_split, opt_all = _sharded_leaves(fns.state_shardings["opt_state"])
  batch_devices = len(np.unique([d.id for d in fns.train_batch_sharding.device_set]))
  # Activation constraints from the models' logical axis names, in the traced step.
  seq_len = cfg.seq_len or model.config.max_len
  batch = jax.ShapeDtypeStruct(
    (cfg.grad_accum, cfg.micro_batch_size, seq_len), np.int32, sharding=fns.train_batch_sharding
  )
  hyper = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
    cfg.optimizer.hyperparams(total_steps=cfg.steps),
  )
  hlo = fns.train_step.lower(fns.abstract_state, {"tokens": batch, "mask": batch}, hyper).as_text()
  constraints = hlo.count("@Sharding") + hlo.count("sharding_constraint")
  print(
    json.dumps(
      {
        "summary": summary,
        "mesh": dict(mesh.shape),
        "params_sharded": params_split,
        "params_total": params_all,
        "opt_sharded": opt_split,
        "opt_total": opt_all,
        "batch_spec": str(fns.train_batch_sharding.spec),
        "batch_devices": batch_devices,
        "activation_constraints": constraints,
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
