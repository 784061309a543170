r"""Prints per-component and total parameter counts of a model config.

    python -m bt_jax.model_summary --gin_file gin_configs/models/block_b4_85m.gin [--json]
    python -m bt_jax.model_summary --gin_file gin_configs/runs/quickstart.gin
    python -m bt_jax.model_summary --workdir /tmp/qs         # its model_config.json

The gin files may be a model file, or a run or experiment file that includes
one (bindings of the training binaries' configurables are skipped); or
--workdir reads the model config a training run saved.

Counts are computed abstractly (`jax.eval_shape`): no weight is allocated, so
the 1.2B config is as cheap as the tiny one.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from absl import flags

from bt_jax import cli, gin_utils
from bt_jax.models import abstract_params, build_model


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_multi_string(
    "gin_file",
    [],
    "Gin files to parse: a model file, or a run or experiment file that includes one.",
    **fv,
  )
  flags.DEFINE_multi_string(
    "gin_param", [], "Gin bindings, e.g. 'BlockConfig.block_len = 8'.", **fv
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "A training workdir: summarise its model_config.json (instead of --gin_file).",
    **fv,
  )
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.", **fv)


# Embedding parameters: token tables and the output head (the paper's "non-emb"
# counts both stacks and the expansion, nothing of the vocabulary).
EMBEDDING_PATHS = (
  ("token_embed",),
  ("lm_head",),
  ("embedder", "lookup"),
  ("embedder", "token_embed"),
)


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def param_counts(config) -> dict[str, Any]:
  """Per-component counts, total and non-embedding parameters of a model config."""
  params = abstract_params(build_model(config))
  components = {name: _count(sub) for name, sub in params.items()}
  if "embedder" in params:  # split the embedder into its table(s) and the rest
    for key, sub in params["embedder"].items():
      components[f"embedder/{key}"] = _count(sub)
    del components["embedder"]
  total = _count(params)
  embedding = sum(_count(_get(params, p)) for p in EMBEDDING_PATHS if _get(params, p) is not None)
  return {
    "kind": config.kind,
    "components": components,
    "total_params": total,
    "embedding_params": embedding,
    "non_embedding_params": total - embedding,
  }


def format_table(counts: dict[str, Any]) -> str:
  rows = [("component", "params")] + [(k, f"{v:,}") for k, v in counts["components"].items()]
  rows += [
    ("non-embedding", f"{counts['non_embedding_params']:,}"),
    ("total", f"{counts['total_params']:,}"),
  ]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{name:<{width}}  {value:>15}" for name, value in rows)


def model_config_from_flags(flag_values: flags.FlagValues):
  """The config of --workdir, or of the --gin_file / --gin_param files."""
  if bool(flag_values.workdir) == bool(flag_values.gin_file):
    raise cli.UserError(
      "give either --gin_file (a model, run or experiment gin file) or "
      "--workdir (a training run), not both or neither"
    )
  if flag_values.workdir:
    if flag_values.gin_param:
      raise cli.UserError("--gin_param applies to --gin_file, not to --workdir")
    from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel  (orbax: slow)

    try:
      return checkpointing.load_model_config(flag_values.workdir)
    except ValueError as e:  # an unreadable model_config.json
      raise cli.UserError(cli.one_line(e)) from e
  try:
    return gin_utils.model_config_from_gin(
      flag_values.gin_file, flag_values.gin_param, skip_unknown=True
    )
  except ValueError as e:  # a gin file that does not parse or names no model
    raise cli.UserError(cli.one_line(e)) from e


def main(flag_values: flags.FlagValues) -> dict[str, Any]:
  config = model_config_from_flags(flag_values)
  counts = param_counts(config)
  if flag_values.json:
    print(json.dumps(counts))
  else:
    print(f"{config.kind} model: {config}")
    print(format_table(counts))
  return counts


if __name__ == "__main__":
  cli.run(main, define_flags)
