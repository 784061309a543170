"""Gin at the edges (T5X habit): the binaries call `parse_gin`; the library never imports gin.

Configurables registered here:
  VanillaConfig, BlockConfig   the frozen model-config dataclasses;
  model.config                 the model a run uses (`model.config = @BlockConfig()`).
Binaries register their own run-level configurables next to their flags.
"""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Sequence

import gin
import logging

from bt_jax import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin_configs"

VanillaConfig = gin.external_configurable(config_lib.VanillaConfig, "VanillaConfig")
BlockConfig = gin.external_configurable(config_lib.BlockConfig, "BlockConfig")


class _QuietResourceReader:
  """Drops gin's resource-reader lines: it logs an error for every include it
  resolves through a search path instead of a Python package."""

  def filter(self, record) -> bool:  # logging.Filter protocol
    return getattr(record, "filename", "") != "resource_reader.py"


logging.getLogger().addFilter(_QuietResourceReader())  # gin logs to the root logger


@gin.configurable
def model(config=gin.REQUIRED):
  """Returns the model config bound in gin (`model.config = @VanillaConfig()`)."""
  return config


def _search_paths() -> list[str]:
  return [str(GIN_DIR), str(REPO_ROOT), os.getcwd()]


def _resolve_file(path: str) -> str:
  if os.path.exists(path):
    return path
  for base in _search_paths():
    candidate = os.path.join(base, path)
    if os.path.exists(candidate):
      return candidate
  shipped = sorted(str(p.relative_to(REPO_ROOT)) for p in GIN_DIR.rglob("*.gin"))
  close = difflib.get_close_matches(path, shipped, n=3, cutoff=0.3)
  hint = f"; did you mean {close}?" if close else ""
  raise FileNotFoundError(f"gin file {path!r} not found (searched {_search_paths()}){hint}")


def parse_gin(
  gin_files: Sequence[str] = (),
  gin_params: Sequence[str] = (),
  *,
  finalize: bool = True,
  skip_unknown: bool = False,
) -> None:
  """Parses gin files then bindings, raising errors that name the bad file or binding.

  skip_unknown: ignore bindings of configurables not registered in this
  process (a run file's `train.*` when only the model is wanted).
  """
  gin.clear_config()
  for path in _search_paths():
    gin.add_config_file_search_path(path)
  for path in gin_files:
    resolved = _resolve_file(path)
    try:
      gin.parse_config_file(resolved, skip_unknown=skip_unknown)
    except Exception as e:  # gin raises several exception types
      raise ValueError(f"could not parse gin file {path!r}: {e}") from e
  for binding in gin_params:
    if "=" not in binding and not binding.strip().startswith(("include", "import")):
      raise ValueError(
        f"malformed gin binding {binding!r}: bindings look like "
        "'Configurable.parameter = value' (e.g. 'BlockConfig.block_len = 8')"
      )
    try:
      gin.parse_config(binding, skip_unknown=skip_unknown)
    except Exception as e:
      raise ValueError(
        f"could not parse gin binding {binding!r}: {e}. Bindings look like "
        "'Configurable.parameter = value' (e.g. 'BlockConfig.block_len = 8')"
      ) from e
  if finalize:
    gin.finalize()


def model_config_from_gin(
  gin_files: Sequence[str] = (), gin_params: Sequence[str] = (), *, skip_unknown: bool = False
):
  """Parses gin and returns the bound model config (skip_unknown: see parse_gin;
  it lets a run or experiment gin file, which includes a model, be read too)."""
  parse_gin(gin_files, gin_params, skip_unknown=skip_unknown)
  try:
    return model()
  except Exception as e:
    raise ValueError(f"gin files {list(gin_files)} do not define a valid model: {e}") from e
