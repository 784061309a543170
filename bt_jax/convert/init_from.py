"""Initial parameters for a new run from a trained model: fine-tuning and uptraining.

    params = init_params_from("runs/pythia_160m", target_config, abstract_params(model))

- Same architecture (fine-tuning): the source's parameters, checked leaf by
  leaf against the target's shapes and cast to its dtypes.
- Vanilla -> Block Transformer (uptraining; Block Transformer paper, arXiv
  2406.02657, and its official code's `load_block_from_vanilla_checkpoint`
  with the "partition" method): the lower half of the vanilla layers becomes
  the block decoder and the upper half the token decoder; the token embedding
  is copied into the `projection` embedder (its projection initialised to the
  mean of the block's L embeddings) and into the token decoder; the vanilla
  final LayerNorm and head go to the token decoder; the expansion is the
  identity replicated into each of the P prefixes (zero bias). The block
  decoder's final LayerNorm has no vanilla counterpart and starts as the
  identity (scale 1, bias 0), as in the official code.

The source is a bt_jax workdir (model_config.json) or a Hugging Face GPT-NeoX
folder (config.json); `train.init_from` is meant to call this.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

from bt_jax.config import BlockConfig, ModelConfig, VanillaConfig
from bt_jax.convert.gpt_neox import ConversionError


def load_source(source: str, step: Optional[int] = None) -> tuple[ModelConfig, Any]:
  """(config, params as numpy) of a bt_jax workdir or a HF GPT-NeoX folder."""
  source = os.fspath(source)
  if os.path.isfile(os.path.join(source, "model_config.json")):
    from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel

    model, params, _ = checkpointing.load_for_inference(source, step=step)
    return model.config, jax.tree.map(np.asarray, params)
  if os.path.isfile(os.path.join(source, "config.json")):
    from bt_jax.convert.hf import load_hf  # pylint: disable=import-outside-toplevel

    config, params, _, _ = load_hf(source)
    return config, params
  raise FileNotFoundError(
    f"{source!r} is neither a bt_jax workdir (model_config.json) nor a "
    "Hugging Face model folder (config.json)"
  )


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def fit_to(params: Any, target_abstract: Any, what: str = "source") -> Any:
  """`params` checked against the target tree (same names, same shapes) and
  cast to the target's dtypes; a mismatch names the parameter."""
  flat_src = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat_tgt = jax.tree_util.tree_flatten_with_path(target_abstract)
  names = {_path_name(p) for p, _ in flat_tgt[0]}
  missing = sorted(names - set(flat_src))
  extra = sorted(set(flat_src) - names)
  if missing or extra:
    raise ConversionError(
      f"the {what} parameters do not match the target model: missing "
      f"{missing[:6]}, unexpected {extra[:6]}"
    )
  leaves = []
  for path, target in flat_tgt[0]:
    name = _path_name(path)
    value = flat_src[name]
    if tuple(value.shape) != tuple(target.shape):
      raise ConversionError(
        f"parameter {name}: the {what} has shape {tuple(value.shape)}, "
        f"the target model {tuple(target.shape)}"
      )
    leaves.append(np.asarray(value, dtype=target.dtype))
  return jax.tree_util.tree_unflatten(flat_tgt[1], leaves)


def uptrain_params(source_config: VanillaConfig, source: Any, target: BlockConfig) -> dict:
  """Block Transformer params from vanilla ones (see the module docstring)."""
  problems = []
  if target.embedder != "projection":
    problems.append(f"embedder {target.embedder!r} (uptraining uses 'projection')")
  if target.token_decoder != "prefix":
    problems.append(f"token_decoder {target.token_decoder!r} (uptraining uses 'prefix')")
  width = source_config.width
  if target.block_width != width or target.token_width != width:
    problems.append(
      f"block_width {target.block_width} / token_width {target.token_width} "
      f"(both must equal the vanilla width {width})"
    )
  if target.block_layers + target.token_layers != source_config.num_layers:
    problems.append(
      f"block_layers {target.block_layers} + token_layers {target.token_layers} "
      f"(must add up to the vanilla num_layers {source_config.num_layers})"
    )
  if target.vocab_size != source_config.vocab_size:
    problems.append(
      f"vocab_size {target.vocab_size} (the vanilla model has {source_config.vocab_size})"
    )
  for stack_name in ("block_stack", "token_stack"):
    stack, src = getattr(target, stack_name), source_config.stack
    for field in ("resolved_head_dim", "mlp_ratio", "rotary_pct", "rotary_base", "layer_norm_eps"):
      if getattr(stack, field) != getattr(src, field):
        problems.append(
          f"{stack_name}.{field} {getattr(stack, field)} (the vanilla stack has "
          f"{getattr(src, field)})"
        )
  if problems:
    raise ConversionError(
      "cannot uptrain this vanilla model into the target Block Transformer: " + "; ".join(problems)
    )
  decoder = source["decoder"]
  embed = np.asarray(source["token_embed"]["embedding"])
  block_len, prefixes = target.block_len, target.num_expanded
  eye = np.eye(width, dtype=np.float32)
  block_decoder = {f"layer_{i}": decoder[f"layer_{i}"] for i in range(target.block_layers)}
  block_decoder["final_ln"] = {
    "scale": np.ones(width, np.float32),
    "bias": np.zeros(width, np.float32),
  }
  token_decoder = {
    f"layer_{i}": decoder[f"layer_{i + target.block_layers}"] for i in range(target.token_layers)
  }
  token_decoder["final_ln"] = decoder["final_ln"]
  return {
    "embedder": {
      "token_embed": {"embedding": embed},
      # flattened [L * D] block -> D: the mean of the L embeddings
      "projection": {
        "kernel": np.tile(eye / block_len, (block_len, 1)),
        "bias": np.zeros(width, np.float32),
      },
    },
    "block_decoder": block_decoder,
    # each prefix j (channels j*D .. (j+1)*D) starts as a copy of the context embedding
    "expansion": {
      "kernel": np.tile(eye, (1, prefixes)),
      "bias": np.zeros(prefixes * width, np.float32),
    },
    "token_embed": {"embedding": embed},
    "token_decoder": token_decoder,
    "lm_head": {"kernel": np.asarray(source["lm_head"]["kernel"])},
  }


def init_params_from(
  source: str,
  target_config: ModelConfig,
  target_params_abstract: Any,
  *,
  step: Optional[int] = None,
) -> Any:
  """Initial params for `target_config` from the model at `source` (a bt_jax
  workdir, optionally at `step`, or a HF GPT-NeoX folder): fine-tuning when
  the architectures agree, uptraining for vanilla -> block. Returns numpy
  arrays with the shapes and dtypes of `target_params_abstract` (from
  `bt_jax.models.abstract_params`)."""
  source_config, params = load_source(source, step)
  if isinstance(target_config, BlockConfig) and isinstance(source_config, VanillaConfig):
    params = uptrain_params(source_config, params, target_config)
    return fit_to(params, target_params_abstract, "uptrained")
  if type(source_config) is not type(target_config):
    raise ConversionError(
      f"cannot initialise a {target_config.kind} model from the "
      f"{source_config.kind} model at {source!r}; supported: the same kind "
      "(fine-tuning) or vanilla -> block (uptraining)"
    )
  stacks = ("block_stack", "token_stack") if isinstance(target_config, BlockConfig) else ("stack",)
  problems = []
  for stack_name in stacks:
    ours, theirs = getattr(target_config, stack_name), getattr(source_config, stack_name)
    for field in ("resolved_head_dim", "rotary_pct", "rotary_base", "layer_norm_eps"):
      if getattr(ours, field) != getattr(theirs, field):
        problems.append(
          f"{stack_name}.{field}: target {getattr(ours, field)}, source {getattr(theirs, field)}"
        )
  if problems:
    raise ConversionError(
      f"the target model computes differently from the model at {source!r} "
      "(same shapes, other numbers): " + "; ".join(problems)
    )
  return fit_to(params, target_params_abstract, f"model at {source!r}")
