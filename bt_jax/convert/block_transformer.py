"""Checkpoints of the official Block Transformer code -> bt_jax BlockTransformer params.

The official PyTorch implementation (github.com/itsnamgyu/block-transformer,
Ho et al. 2024, "Block Transformer: Global-to-Local Language Modeling for Fast
Inference", arXiv 2406.02657) saves one state dict for its `BlockTransformer`
module (HF Trainer: `checkpoint-N/model.safetensors`). Names and layouts:

    embedder.embeddings.weight              [V, D_blk / L] lookup table (concat)
    embedder.projection_layer.{weight,bias} Conv1d(D_emb -> D_blk, kernel L): [D_blk, D_emb, L]
    block_decoder.gpt_neox.layers.i.*       GPT-NeoX layers over block vectors
    block_decoder.gpt_neox.final_layer_norm.*
    block_decoder.gpt_neox.embed_in.weight  unused (the block decoder reads vectors): skipped
    token_decoder.gpt_neox.embed_in.weight  the token decoder's embedding [V, D_tok]
    token_decoder.gpt_neox.layers.i.*, token_decoder.gpt_neox.final_layer_norm.*
    token_decoder.embed_out.weight          the untied output head [V, D_tok]
    token_decoder.expansion_layer.{weight,bias}  Conv1d(D_blk -> P * D_tok, kernel 1):
                                            [P * D_tok, D_blk, 1]; prefix j = rows j*D_tok..

Only the `prefix` token decoder and the `lookup` / `projection` embedders are
read (the variants whose bt_jax forward was checked against the official
layout); anything else is refused. Every released checkpoint (the paper's
main models, the official configs `block_main_b4_*`) has the lookup embedder and
the prefix token decoder; the official code's `summation` / `cross_attention`
decoders and RoBERTa / T5 embedders belong to its ablations and baselines,
which its README does not offer as checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from bt_jax.config import BlockConfig
from bt_jax.convert.gpt_neox import (
  SKIPPED_SUFFIXES,
  ConversionError,
  TensorReader,
  head_tensor_name,
  stack_from_hf,
)
from bt_jax.convert.hf import torch_state_dict
from bt_jax.convert.safetensors_io import TensorSource
from bt_jax.convert.workdir import write_workdir
from bt_jax.data.tokenizer import Tokenizer

# Tensors the official module holds that bt_jax has no use for, by design.
SKIPPED = ("block_decoder.gpt_neox.embed_in.weight",)


def _skipped(name: str) -> bool:
  return name in SKIPPED or name.endswith(SKIPPED_SUFFIXES)


class _Prefixed:
  """A view of a tensor source with a common name prefix ("module.") removed."""

  def __init__(self, source, prefix: str):
    self._source, self._prefix = source, prefix

  def __contains__(self, name):
    return self._prefix + name in self._source

  def __getitem__(self, name):
    return self._source[self._prefix + name]

  def shape(self, name):
    return self._source.shape(self._prefix + name)

  def __iter__(self):
    return (n[len(self._prefix) :] for n in self._source)


def _strip_wrapper(source):
  names = list(source)
  for prefix in ("module.", "model."):
    if names and all(n.startswith(prefix) for n in names):
      return _Prefixed(source, prefix)
  return source


def block_params_from_official(source, config: BlockConfig, dtype: str = "float32") -> dict:
  """bt_jax BlockTransformer params from an official state dict; every tensor
  is mapped or deliberately skipped, and a shape mismatch names the tensor."""
  if config.token_decoder != "prefix":
    raise ConversionError(
      f"token_decoder {config.token_decoder!r} cannot be read from an official checkpoint: the "
      "converter reads the 'prefix' token decoder only, the one every released checkpoint "
      "(block_main_b4_*) uses; the official code's 'summation' and 'cross_attention' decoders "
      "appear only in its ablation and MEGABYTE-baseline runs, which it does not offer as "
      "checkpoints (docs/convert.md). Describe the checkpoint with a prefix model gin file "
      "(BlockConfig.token_decoder = 'prefix', e.g. models/block_b4_85m.gin)"
    )
  if config.embedder not in ("lookup", "projection"):
    raise ConversionError(
      f"embedder {config.embedder!r} cannot be read from an official "
      "checkpoint; supported: 'lookup', 'projection'"
    )
  source = _strip_wrapper(source)
  reader = TensorReader(source, dtype)
  cast = reader.cast
  vocab, block_len = config.vocab_size, config.block_len
  d_blk, d_tok = config.block_width, config.token_width
  if config.embedder == "lookup":
    embedder = {
      "lookup": {
        "embedding": cast(reader.take("embedder.embeddings.weight", (vocab, d_blk // block_len)))
      }
    }
  else:
    weight = reader.take("embedder.projection_layer.weight", (d_blk, d_blk, block_len))
    # Conv1d [out, in, k] over the block; bt_jax flattens [k, in] -> row k * D + in.
    embedder = {
      "token_embed": {"embedding": cast(reader.take("embedder.embeddings.weight", (vocab, d_blk)))},
      "projection": {
        "kernel": cast(np.transpose(weight, (2, 1, 0)).reshape(block_len * d_blk, d_blk)),
        "bias": cast(reader.take("embedder.projection_layer.bias", (d_blk,))),
      },
    }
  expansion_w = reader.take(
    "token_decoder.expansion_layer.weight", (config.num_expanded * d_tok, d_blk, 1)
  )
  params = {
    "embedder": embedder,
    "block_decoder": stack_from_hf(reader, "block_decoder.gpt_neox.", config.block_stack),
    "expansion": {
      "kernel": cast(expansion_w[:, :, 0].T),
      "bias": cast(
        reader.take("token_decoder.expansion_layer.bias", (config.num_expanded * d_tok,))
      ),
    },
    "token_embed": {
      "embedding": cast(reader.take("token_decoder.gpt_neox.embed_in.weight", (vocab, d_tok)))
    },
    "token_decoder": stack_from_hf(reader, "token_decoder.gpt_neox.", config.token_stack),
    "lm_head": {
      "kernel": cast(reader.take(head_tensor_name(reader, "token_decoder."), (vocab, d_tok)).T)
    },
  }
  reader.check_all_used(_skipped)
  return params


def open_official_checkpoint(path: str):
  """(tensor source, step) of a state dict file or an HF-Trainer checkpoint-N/ folder."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  step = 0
  if os.path.isdir(path):
    match = re.search(r"checkpoint-(\d+)$", os.path.normpath(path))
    state_path = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state_path):
      with open(state_path, encoding="utf-8") as f:
        step = int(json.load(f).get("global_step", 0))
    elif match:
      step = int(match.group(1))
    for name in ("model.safetensors.index.json", "model.safetensors"):
      if os.path.isfile(os.path.join(path, name)):
        return TensorSource.open(os.path.join(path, name)), step
    for name in ("pytorch_model.bin",):
      if os.path.isfile(os.path.join(path, name)):
        return torch_state_dict(os.path.join(path, name)), step
    raise FileNotFoundError(f"{path!r} holds no model.safetensors or pytorch_model.bin")
  if path.endswith((".bin", ".pt", ".pth")):
    return torch_state_dict(path), step
  return TensorSource.open(path), step


def from_block_transformer(
  checkpoint: str,
  config: BlockConfig,
  workdir: str,
  *,
  tokenizer: Optional[str] = None,
  dtype: str = "float32",
  eval_no_pad: bool = False,
) -> str:
  """Converts an official checkpoint to a bt_jax workdir. `config` (from the
  model's gin file) must describe the checkpoint's shapes; `tokenizer` is the
  tokenizer.json (default: one inside the checkpoint folder); `eval_no_pad`
  is recorded in model_config.json for zero-shot scoring."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from bt_jax.convert.gpt_neox import numpy_dtype  # pylint: disable=import-outside-toplevel

  numpy_dtype(dtype)
  if tokenizer is None:
    candidate = os.path.join(checkpoint, "tokenizer.json")
    if not os.path.isfile(candidate):
      raise FileNotFoundError(
        f"{checkpoint!r} holds no tokenizer.json; pass --tokenizer "
        "(the Pythia tokenizer.json the model was trained with)"
      )
    tokenizer = candidate
  tok = Tokenizer.from_file(tokenizer)
  source, step = open_official_checkpoint(checkpoint)
  if tok.vocab_size > config.vocab_size:
    raise ConversionError(
      f"tokenizer {tokenizer!r} has {tok.vocab_size} ids, more than the "
      f"model's vocab_size {config.vocab_size}"
    )
  config = dataclasses.replace(
    config, dtype=dtype, param_dtype=dtype, eval_no_pad=eval_no_pad, pad_id=tok.pad_id
  )
  params = block_params_from_official(source, config, dtype)
  info = {
    "source": "block_transformer",
    "input": os.path.abspath(checkpoint),
    "step": step,
    "dtype": dtype,
    "eval_no_pad": eval_no_pad,
  }
  return write_workdir(workdir, config, params, tok.to_json(), step=step, info=info)
