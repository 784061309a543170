"""Saving and loading a trained draft head: DIR/drafter.json (its config and
what it was trained for) and DIR/params (orbax). The params are written
first and the JSON last, each atomically, so a DIR with drafter.json is
complete; a crash in between leaves nothing that loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from bt_jax.checkpointing import write_text_atomic
from bt_jax.redrafter.drafter import DrafterConfig, DraftHead, init_drafter

CONFIG_FILE = "drafter.json"
PARAMS_DIR = "params"


def save_drafter(directory: str, drafter: DraftHead, params: Any,
                 metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes the draft head to `directory` (made if missing; an earlier
  drafter there is replaced)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  config_path = os.path.join(directory, CONFIG_FILE)
  if os.path.exists(config_path):
    os.remove(config_path)          # incomplete until the new JSON lands
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
  record = {"config": dataclasses.asdict(drafter.config), "metadata": dict(metadata or {})}
  write_text_atomic(config_path, json.dumps(record, indent=2, sort_keys=True))


def load_drafter(directory: str) -> tuple[DraftHead, Any, dict]:
  """(drafter, params, metadata) from `directory`; errors name what is missing."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory!r} holds no trained drafter: no {CONFIG_FILE} (made by "
                            "python -m bt_jax.train_drafter)")
  with open(config_path, encoding="utf-8") as f:
    try:
      record = json.load(f)
      config = DrafterConfig(**record["config"])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{config_path} is not a drafter config: {e}") from e
  drafter = DraftHead(config)
  abstract = jax.eval_shape(lambda: init_drafter(drafter, jax.random.key(0)))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), abstract)
  return drafter, params, record.get("metadata", {})


def check_drafter_fits(drafter: DraftHead, model_config) -> None:
  """A drafter trained for another base model is an error naming the sizes."""
  cfg = drafter.config
  want = (model_config.vocab_size, model_config.width)
  if (cfg.vocab_size, cfg.hidden_dim) != want or cfg.embed_dim != model_config.width:
    raise ValueError(f"the drafter was made for vocab {cfg.vocab_size} and width "
                     f"{cfg.hidden_dim}; this base model has vocab {want[0]} and width {want[1]}")
