"""A local Hugging Face GPT-NeoX folder <-> a bt_jax workdir.

    from_hf("pythia-410m-deduped/", "runs/pythia_410m")       # config.json + safetensors
    to_hf("runs/pythia_410m", "pythia_410m_hf/")              # back, for transformers

Read with numpy only (safetensors parsed by `safetensors_io`); torch is needed
only for a `pytorch_model.bin` checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

import numpy as np

from bt_jax import checkpointing
from bt_jax.config import VanillaConfig
from bt_jax.convert import gpt_neox
from bt_jax.convert.gpt_neox import ConversionError
from bt_jax.convert.safetensors_io import DictSource, TensorSource, write_safetensors
from bt_jax.convert.workdir import staged_dir, write_workdir
from bt_jax.data.tokenizer import Tokenizer


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ConversionError(f"{path!r} is not valid JSON: {e}") from e


def torch_state_dict(path: str) -> DictSource:
  """A pytorch_model.bin (or .pt) state dict as numpy arrays; needs torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(
      f"{path!r} is a torch pickle and torch is not installed. Convert it to safetensors "
      "where torch is available (e.g. `transformers` `model.save_pretrained(dir, "
      "safe_serialization=True)`), or install torch"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  out = DictSource()
  for name, tensor in state.items():
    if tensor.dtype == torch.bfloat16:
      import ml_dtypes  # pylint: disable=import-outside-toplevel

      out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = tensor.numpy()
  return out


def open_checkpoint(folder: str):
  """The tensors of a HF model folder: safetensors (single or sharded), else pytorch_model.bin."""
  for name in ("model.safetensors.index.json", "model.safetensors"):
    if os.path.isfile(os.path.join(folder, name)):
      return TensorSource.open(os.path.join(folder, name))
  bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
  if len(bins) == 1:
    return torch_state_dict(bins[0])
  if bins:
    merged = DictSource()
    for path in bins:
      merged.update(torch_state_dict(path))
    return merged
  raise FileNotFoundError(
    f"{folder!r} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
  )


def _token_id(tokenizer: Tokenizer, token) -> Optional[int]:
  if isinstance(token, dict):
    token = token.get("content")
  if not isinstance(token, str):
    return None
  found = tokenizer.hf_tokenizer.token_to_id(token)
  return None if found is None else int(found)


def special_token_ids(
  folder: str, hf_config: dict, tokenizer: Tokenizer
) -> dict[str, Optional[int]]:
  """BOS/EOS/pad ids as the HF folder declares them (tokenizer_config.json,
  special_tokens_map.json, then config.json)."""
  declared: dict[str, Any] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      declared.update({k: v for k, v in _read_json(path).items() if v is not None})
  ids = {}
  for kind in ("bos", "eos", "pad"):
    found = _token_id(tokenizer, declared.get(f"{kind}_token"))
    if found is None and isinstance(hf_config.get(f"{kind}_token_id"), int):
      found = hf_config[f"{kind}_token_id"]
    ids[kind] = found
  return ids


def load_hf(folder: str, *, dtype: str = "float32"):
  """(VanillaConfig, params as numpy, Tokenizer, info) from a local HF GPT-NeoX folder."""
  folder = os.fspath(folder)
  gpt_neox.numpy_dtype(dtype)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Hugging Face model folder {folder!r} does not exist")
  config_path = os.path.join(folder, "config.json")
  hf_config = _read_json(config_path)
  tokenizer_path = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(
      f"{folder!r} has no tokenizer.json (a `tokenizers` file is needed; "
      "slow vocab.json/merges.txt tokenizers are not read)"
    )
  tokenizer = Tokenizer.from_file(tokenizer_path)
  ids = special_token_ids(folder, hf_config, tokenizer)
  if ids["eos"] is not None and ids["eos"] != tokenizer.eos_id:
    raise ConversionError(
      f"{folder!r} declares EOS id {ids['eos']}, but bt_jax reads {tokenizer.eos_token!r} "
      f"(id {tokenizer.eos_id}) as the end-of-text token of its tokenizer.json"
    )
  config = gpt_neox.vanilla_config_from_hf(
    hf_config, dtype=dtype, pad_id=tokenizer.eos_id, source=config_path
  )
  if tokenizer.vocab_size > config.vocab_size:
    raise ConversionError(
      f"tokenizer.json has {tokenizer.vocab_size} ids but the model's "
      f"embedding only {config.vocab_size} rows"
    )
  source = open_checkpoint(folder)
  params = gpt_neox.vanilla_params_from_hf(source, config, hf_config, dtype)
  info = {
    "source": "huggingface",
    "input": os.path.abspath(folder),
    "hf_special_token_ids": ids,
    "tokenizer_vocab_size": tokenizer.vocab_size,
    "tied_head_copied": bool(hf_config.get("tie_word_embeddings", False)),
  }
  return config, params, tokenizer, info


def from_hf(folder: str, workdir: str, *, dtype: str = "float32") -> str:
  """Converts a local HF GPT-NeoX folder into a bt_jax workdir (step 0)."""
  config, params, tokenizer, info = load_hf(folder, dtype=dtype)
  info["dtype"] = dtype
  return write_workdir(workdir, config, params, tokenizer.to_json(), step=0, info=info)


def to_hf(workdir: str, output: str, *, step: Optional[int] = None) -> str:
  """Writes a vanilla bt_jax workdir as a HF folder GPTNeoXForCausalLM and
  AutoTokenizer load: config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json, special_tokens_map.json, generation_config.json."""
  model, params, tokenizer = checkpointing.load_for_inference(workdir, step=step)
  config = model.config
  if not isinstance(config, VanillaConfig):
    raise ConversionError(
      f"workdir {workdir!r} holds a {config.kind} model; only vanilla "
      "(GPT-NeoX) models have a transformers equivalent"
    )
  info_path = os.path.join(workdir, "convert_info.json")
  declared = (
    _read_json(info_path).get("hf_special_token_ids", {}) if os.path.isfile(info_path) else {}
  )
  bos = declared.get("bos", tokenizer.eos_id)
  bos = tokenizer.eos_id if bos is None else bos
  eos = tokenizer.eos_id
  dtype = np.asarray(params["token_embed"]["embedding"]).dtype
  torch_dtype = "bfloat16" if dtype.name == "bfloat16" else "float32"
  producers = gpt_neox.vanilla_params_to_hf(params, config)
  layout = []
  for name, produce in producers.items():
    array = produce()
    layout.append((name, array.shape, array.dtype))
  with staged_dir(output) as staging:
    write_safetensors(
      os.path.join(staging, "model.safetensors"),
      layout,
      lambda name: producers[name](),
      metadata={"format": "pt"},
    )
    hf_config = gpt_neox.hf_config_from_vanilla(
      config, bos_id=bos, eos_id=eos, torch_dtype=torch_dtype
    )
    tok_config = {
      "tokenizer_class": "GPTNeoXTokenizer",
      "eos_token": tokenizer.eos_token,
      "bos_token": tokenizer.hf_tokenizer.id_to_token(bos),
      "unk_token": tokenizer.eos_token,
      "model_max_length": config.max_len,
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
    }
    pad = declared.get("pad")
    if pad is not None:
      tok_config["pad_token"] = tokenizer.hf_tokenizer.id_to_token(pad)
    files = {
      "config.json": hf_config,
      "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos},
      "tokenizer_config.json": tok_config,
      "special_tokens_map.json": {k: v for k, v in tok_config.items() if k.endswith("_token")},
    }
    for name, content in files.items():
      with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    with open(os.path.join(staging, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tokenizer.to_json())
  return os.path.abspath(output)
