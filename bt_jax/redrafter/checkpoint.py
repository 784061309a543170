"""Saving and loading a trained draft head: DIR/drafter.json (format
version, its config with the variant, the base model it was trained for,
metadata) and DIR/params (orbax). The params are written
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
# 1: no "format" key; the paper's head only (own vocabulary projection,
#    ResBlocks at 2H, SiLU recurrence). 2: the config names its variant
#    (recurrence, exit_dim, lm_head) and "base_model" its base model.
FORMAT_VERSION = 2
# What a version-1 drafter.json meant for the fields it did not have.
_V1_VARIANT = {"recurrence": "silu", "exit_dim": None, "lm_head": "own"}


def save_drafter(
  directory: str,
  drafter: DraftHead,
  params: Any,
  metadata: Optional[Mapping[str, Any]] = None,
  base_config: Any = None,
) -> None:
  """Writes the draft head to `directory` (made if missing; an earlier
  drafter there is replaced). base_config: the base model's config, whose
  kind, width and vocabulary are recorded (and checked by `check_drafter_fits`)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  config_path = os.path.join(directory, CONFIG_FILE)
  if os.path.exists(config_path):
    os.remove(config_path)  # incomplete until the new JSON lands
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
  record = {
    "format": FORMAT_VERSION,
    "config": dataclasses.asdict(drafter.config),
    "metadata": dict(metadata or {}),
  }
  if base_config is not None:
    record["base_model"] = _base_signature(base_config)
  write_text_atomic(config_path, json.dumps(record, indent=2, sort_keys=True))


def load_drafter(directory: str) -> tuple[DraftHead, Any, dict]:
  """(drafter, params, metadata) from `directory`; errors name what is
  missing. Reads format 1 (before variants) and 2; a newer one is an error
  naming both versions. metadata["base_model"]: the recorded base model."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
      f"{directory!r} holds no trained drafter: no {CONFIG_FILE} (made by "
      "python -m bt_jax.train_drafter)"
    )
  with open(config_path, encoding="utf-8") as f:
    try:
      record = json.load(f)
      version = record.get("format", 1)
      if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise _FormatError(
          f"{config_path} has drafter format {version!r}; this bt_jax reads "
          f"formats 1 to {FORMAT_VERSION} (a newer bt_jax wrote it?)"
        )
      fields = dict(record["config"])
      if version == 1:
        unexpected = sorted(set(fields) & set(_V1_VARIANT))
        if unexpected:
          raise ValueError(f"format 1 has no field {unexpected}")
        fields.update(_V1_VARIANT)
      config = DrafterConfig(**fields)
    except _FormatError:
      raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{config_path} is not a drafter config: {e}") from e
  drafter = DraftHead(config)
  abstract = jax.eval_shape(lambda: init_drafter(drafter, jax.random.key(0)))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), abstract)
  metadata = dict(record.get("metadata", {}))
  if "base_model" in record:
    metadata["base_model"] = record["base_model"]
  return drafter, params, metadata


class _FormatError(ValueError):
  pass


def _base_signature(model_config) -> dict:
  return {
    "kind": model_config.kind,
    "width": getattr(model_config, "width", None),
    "vocab_size": model_config.vocab_size,
  }


def check_drafter_fits(
  drafter: DraftHead, model_config, recorded_base: Optional[Mapping[str, Any]] = None
) -> None:
  """A drafter made for another base model is an error naming both sides:
  its vocabulary, hidden width and embedding width against the model's, and
  (from drafter.json's "base_model", when given) the kind it was trained on."""
  cfg = drafter.config
  have = _base_signature(model_config)
  if recorded_base and recorded_base.get("kind") not in (None, have["kind"]):
    raise ValueError(
      f"the drafter was trained for a {recorded_base['kind']} base model; this "
      f"base model is {have['kind']}"
    )
  if have["kind"] != "vanilla":
    raise ValueError(
      f"the draft head drafts for a vanilla base model; this base model is {have['kind']}"
    )
  if (cfg.vocab_size, cfg.hidden_dim, cfg.embed_dim) != (
    have["vocab_size"],
    have["width"],
    have["width"],
  ):
    raise ValueError(
      f"the drafter was made for vocab {cfg.vocab_size} and width "
      f"{cfg.hidden_dim}; this base model has vocab {have['vocab_size']} and "
      f"width {have['width']}"
      + (
        f" (the drafter's embedding width is {cfg.embed_dim})"
        if cfg.embed_dim != cfg.hidden_dim
        else ""
      )
    )
