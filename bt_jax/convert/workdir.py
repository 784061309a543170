"""Writing a converted model as an ordinary bt_jax workdir, all or nothing.

The workdir is built in a hidden folder beside the target and renamed into
place at the end, so an error (or a kill) never leaves a half-written workdir
under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator, Optional

import numpy as np

from bt_jax import checkpointing
from bt_jax.config import ModelConfig

CONVERT_INFO_FILE = "convert_info.json"


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[str]:
  """Yields a fresh folder next to `target`; renames it to `target` if the
  block succeeds, deletes it if it raises. `target` must not exist yet."""
  target = os.path.abspath(os.fspath(target))
  if os.path.exists(target):
    raise FileExistsError(
      f"{target!r} already exists; choose a new directory (nothing was overwritten)"
    )
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".{os.path.basename(target)}.partial-{os.getpid()}")
  if os.path.exists(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  try:
    yield staging
    os.rename(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def write_workdir(
  workdir: str | os.PathLike,
  config: ModelConfig,
  params: Any,
  tokenizer_json: str,
  *,
  step: int = 0,
  info: Optional[dict[str, Any]] = None,
) -> str:
  """DIR/model_config.json, DIR/tokenizer.json, DIR/checkpoints/<step>/params
  (what `bt_jax.checkpointing.load_for_inference` reads), and
  DIR/convert_info.json recording where the weights came from."""
  with staged_dir(workdir) as staging:
    checkpointing.save_model_config(staging, config)
    checkpointing.write_text_atomic(
      os.path.join(staging, checkpointing.TOKENIZER_FILE), tokenizer_json
    )
    checkpointer = checkpointing.Checkpointer(staging, async_save=False)
    try:
      checkpointer.save(step, params, {"step": np.asarray(step, np.int64)})
    finally:
      checkpointer.close()
    checkpointing.write_text_atomic(
      os.path.join(staging, CONVERT_INFO_FILE), json.dumps(info or {}, indent=2, sort_keys=True)
    )
  return os.path.abspath(os.fspath(workdir))
