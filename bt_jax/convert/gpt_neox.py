"""Hugging Face GPT-NeoX (Pythia, GPT-NeoX-20B) <-> bt_jax parameter and config mapping.

Layouts (transformers' `modeling_gpt_neox.py`; Biderman et al. 2023, "Pythia",
arXiv 2304.01373; Black et al. 2022, "GPT-NeoX-20B", arXiv 2204.06745):

- `attention.query_key_value.weight` is [3 * width, width] (torch Linear: out,
  in), its rows grouped per head: row h * 3 * head_dim + j * head_dim + d is
  channel d of head h of q (j=0), k (j=1) or v (j=2). bt_jax keeps one full-shape
  kernel [width, heads, head_dim] each for query, key and value.
- `attention.dense.weight` [width, width] reads the heads in order: bt_jax's
  `out` kernel is [heads, head_dim, width].
- Linear weights are [out, in]; bt_jax Dense kernels are [in, out].
- `input_layernorm` -> `ln_attention`, `post_attention_layernorm` -> `ln_mlp`
  (both read the layer input: the parallel residual), `final_layer_norm` ->
  `final_ln`, `embed_in` -> `token_embed`, `embed_out` -> `lm_head`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from bt_jax.config import DTYPES, StackConfig, VanillaConfig

# Buffers some transformers versions saved with the weights; they hold no learned values.
SKIPPED_SUFFIXES = (
  ".attention.bias",
  ".attention.masked_bias",
  ".attention.rotary_emb.inv_freq",
  ".rotary_emb.inv_freq",
)

# config.json fields that change nothing at inference and are accepted as they are.
_IGNORED_FIELDS = {
  "architectures",
  "model_type",
  "transformers_version",
  "torch_dtype",
  "dtype",
  "use_cache",
  "initializer_range",
  "attention_dropout",
  "hidden_dropout",
  "classifier_dropout",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "_name_or_path",
  "gradient_checkpointing",
}


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the culprit."""


def numpy_dtype(dtype: str) -> np.dtype:
  """The numpy dtype of a --dtype value, or an error naming the valid ones."""
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r} cannot be written; valid dtypes are {sorted(DTYPES)}")
  return np.dtype(DTYPES[dtype])


def vanilla_config_from_hf(
  hf: Mapping[str, Any], *, dtype: str = "float32", pad_id: int = 0, source: str = "config.json"
) -> VanillaConfig:
  """A VanillaConfig for a GPT-NeoX config.json; anything bt_jax cannot
  express is refused with the field and its value."""
  model_type = hf.get("model_type")
  if model_type != "gpt_neox":
    raise ConversionError(
      f"{source}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not "
      "GPT-NeoX; only model_type 'gpt_neox' (Pythia, GPT-NeoX-20B) can be converted"
    )

  def refuse(field, value, why):
    raise ConversionError(f"{source}: {field} = {value!r} cannot be converted: {why}")

  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    refuse("hidden_act", act, "bt_jax's MLP uses the exact (erf) GELU, which is 'gelu'")
  if not hf.get("use_parallel_residual", True):
    refuse(
      "use_parallel_residual",
      False,
      "bt_jax layers use the parallel residual x + attn(LN1(x)) + mlp(LN2(x))",
    )
  if not hf.get("attention_bias", True):
    refuse("attention_bias", False, "bt_jax attention projections always carry biases")
  if hf.get("rope_scaling"):
    refuse("rope_scaling", hf["rope_scaling"], "bt_jax has no rotary scaling")
  rotary_pct = hf.get("rotary_pct", 0.25)
  rotary_base = hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0))
  rope = hf.get("rope_parameters")
  if rope:
    if rope.get("rope_type", "default") != "default":
      refuse("rope_parameters.rope_type", rope.get("rope_type"), "bt_jax has no rotary scaling")
    rotary_pct = rope.get("partial_rotary_factor", rotary_pct)
    rotary_base = rope.get("rope_theta", rotary_base)
  width = int(hf["hidden_size"])
  heads = int(hf["num_attention_heads"])
  if width % heads:
    refuse("num_attention_heads", heads, f"hidden_size {width} is not divisible by it")
  intermediate = int(hf.get("intermediate_size") or 4 * width)
  if intermediate % width:
    refuse(
      "intermediate_size",
      intermediate,
      f"bt_jax's MLP width is an integer multiple of hidden_size ({width})",
    )
  try:
    return VanillaConfig(
      vocab_size=int(hf["vocab_size"]),
      max_len=int(hf.get("max_position_embeddings", 2048)),
      dtype=dtype,
      param_dtype=dtype,
      pad_id=pad_id,
      num_layers=int(hf["num_hidden_layers"]),
      width=width,
      head_dim=width // heads,
      mlp_ratio=intermediate // width,
      rotary_pct=float(rotary_pct),
      rotary_base=float(rotary_base),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
    )
  except KeyError as e:
    raise ConversionError(f"{source} has no field {e.args[0]!r}") from e
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e


def hf_config_from_vanilla(
  config: VanillaConfig, *, bos_id: int, eos_id: int, torch_dtype: str = "float32"
) -> dict[str, Any]:
  """The config.json of a GPTNeoXForCausalLM equal to a bt_jax vanilla model
  (untied head, as bt_jax always stores one)."""
  stack = config.stack
  return {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": config.vocab_size,
    "hidden_size": config.width,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": stack.num_heads,
    "intermediate_size": stack.mlp_ratio * stack.width,
    "hidden_act": "gelu",
    "rotary_pct": stack.rotary_pct,
    "rotary_emb_base": stack.rotary_base,
    "max_position_embeddings": config.max_len,
    "layer_norm_eps": stack.layer_norm_eps,
    "use_parallel_residual": True,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "initializer_range": config.init_std,
    "bos_token_id": bos_id,
    "eos_token_id": eos_id,
    "use_cache": True,
    "torch_dtype": torch_dtype,
  }


class TensorReader:
  """Takes tensors from a source by name, checking shapes and keeping count,
  so that every tensor ends up mapped or deliberately skipped."""

  def __init__(self, source, dtype: str, prefix: str = ""):
    self.source = source
    self.dtype = numpy_dtype(dtype)
    self.prefix = prefix
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return self.prefix + name in self.source

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    full = self.prefix + name
    if full not in self.source:
      raise ConversionError(
        f"tensor {full!r} is missing from the checkpoint (expected shape {tuple(shape)})"
      )
    found = tuple(self.source.shape(full))
    if found != tuple(shape):
      raise ConversionError(f"tensor {full!r} has shape {found}, expected {tuple(shape)}")
    array = self.source[full]
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise ConversionError(
        f"tensor {full!r} has dtype {array.dtype}, not a floating-point "
        "type; it cannot become a weight"
      )
    self.used.add(full)
    return array

  def check_all_used(self, skipped: Callable[[str], bool]) -> None:
    left = sorted(n for n in self.source if n not in self.used and not skipped(n))
    if left:
      raise ConversionError(
        f"{len(left)} tensor(s) of the checkpoint map onto nothing: "
        f"{left[:8]}{' ...' if len(left) > 8 else ''}"
      )

  def cast(self, array: np.ndarray):
    """The tensor in the target dtype as a host (CPU) jax array: each converted
    tensor lands where orbax saves it from, so the model is held once."""
    host = jax.devices("cpu")[0]
    return jax.device_put(np.asarray(array, dtype=self.dtype), host)


def stack_from_hf(reader: TensorReader, prefix: str, stack: StackConfig) -> dict:
  """One GPT-NeoX stack (`{prefix}layers.i.*`, `{prefix}final_layer_norm.*`) in
  bt_jax's DecoderStack layout. Each tensor is converted and cast on its own."""
  width, heads, head_dim = stack.width, stack.num_heads, stack.resolved_head_dim
  hidden = stack.mlp_ratio * width
  cast = reader.cast

  def norm(name):
    return {
      "scale": cast(reader.take(f"{name}.weight", (width,))),
      "bias": cast(reader.take(f"{name}.bias", (width,))),
    }

  def dense(name, n_in, n_out):
    return {
      "kernel": cast(reader.take(f"{name}.weight", (n_out, n_in)).T),
      "bias": cast(reader.take(f"{name}.bias", (n_out,))),
    }

  out: dict[str, Any] = {}
  for i in range(stack.num_layers):
    p = f"{prefix}layers.{i}."
    qkv_w = reader.take(p + "attention.query_key_value.weight", (3 * width, width))
    qkv_b = reader.take(p + "attention.query_key_value.bias", (3 * width,))
    qkv_w = qkv_w.reshape(heads, 3, head_dim, width)
    qkv_b = qkv_b.reshape(heads, 3, head_dim)
    attention = {
      name: {"kernel": cast(np.transpose(qkv_w[:, j], (2, 0, 1))), "bias": cast(qkv_b[:, j])}
      for j, name in enumerate(("query", "key", "value"))
    }
    dense_w = reader.take(p + "attention.dense.weight", (width, width))
    attention["out"] = {
      "kernel": cast(dense_w.T.reshape(heads, head_dim, width)),
      "bias": cast(reader.take(p + "attention.dense.bias", (width,))),
    }
    out[f"layer_{i}"] = {
      "attention": attention,
      "mlp": {
        "wi": dense(p + "mlp.dense_h_to_4h", width, hidden),
        "wo": dense(p + "mlp.dense_4h_to_h", hidden, width),
      },
      "ln_attention": norm(p + "input_layernorm"),
      "ln_mlp": norm(p + "post_attention_layernorm"),
    }
  out["final_ln"] = norm(f"{prefix}final_layer_norm")
  return out


def stack_to_hf(
  params: Mapping, prefix: str, stack: StackConfig
) -> dict[str, Callable[[], np.ndarray]]:
  """The inverse of `stack_from_hf`: HF tensor name -> a function making it (torch layout)."""
  width, heads, head_dim = stack.width, stack.num_heads, stack.resolved_head_dim
  out: dict[str, Callable[[], np.ndarray]] = {}

  def put(name, fn):
    out[prefix + name] = fn

  def norm(hf_name, ours):
    put(f"{hf_name}.weight", lambda: np.asarray(ours["scale"]))
    put(f"{hf_name}.bias", lambda: np.asarray(ours["bias"]))

  for i in range(stack.num_layers):
    layer = params[f"layer_{i}"]
    p = f"layers.{i}."
    attn = layer["attention"]

    def qkv_weight(attn=attn):
      # [width, heads, head_dim] x3 -> [heads, 3, head_dim, width] -> [3 * width, width]
      kernels = [
        np.transpose(np.asarray(attn[n]["kernel"]), (1, 2, 0)) for n in ("query", "key", "value")
      ]
      return np.stack(kernels, axis=1).reshape(3 * width, width)

    def qkv_bias(attn=attn):
      return np.stack(
        [np.asarray(attn[n]["bias"]) for n in ("query", "key", "value")], axis=1
      ).reshape(3 * width)

    put(p + "attention.query_key_value.weight", qkv_weight)
    put(p + "attention.query_key_value.bias", qkv_bias)
    put(
      p + "attention.dense.weight",
      lambda attn=attn: np.asarray(attn["out"]["kernel"]).reshape(heads * head_dim, width).T,
    )
    put(p + "attention.dense.bias", lambda attn=attn: np.asarray(attn["out"]["bias"]))
    for hf_name, ours in (("mlp.dense_h_to_4h", "wi"), ("mlp.dense_4h_to_h", "wo")):
      put(f"{p}{hf_name}.weight", lambda d=layer["mlp"][ours]: np.asarray(d["kernel"]).T)
      put(f"{p}{hf_name}.bias", lambda d=layer["mlp"][ours]: np.asarray(d["bias"]))
    norm(p + "input_layernorm", layer["ln_attention"])
    norm(p + "post_attention_layernorm", layer["ln_mlp"])
  norm("final_layer_norm", params["final_ln"])
  return out


def head_tensor_name(reader: TensorReader, prefix: str) -> str:
  """The output head's name: `embed_out.weight` as saved files have it, or
  `lm_head.weight` (transformers 5's module name, in a raw torch state dict)."""
  if not reader.has(prefix + "embed_out.weight") and reader.has(prefix + "lm_head.weight"):
    return prefix + "lm_head.weight"
  return prefix + "embed_out.weight"


def vanilla_params_from_hf(
  source, config: VanillaConfig, hf_config: Mapping[str, Any], dtype: str
) -> dict:
  """bt_jax VanillaLM params from the tensors of a GPTNeoXForCausalLM.

  A tied head (`tie_word_embeddings`, or no `embed_out.weight`) becomes an
  untied copy of the embedding: bt_jax always stores its own head.
  """
  reader = TensorReader(source, dtype)
  shape = (config.vocab_size, config.width)
  embed = reader.cast(reader.take("gpt_neox.embed_in.weight", shape))
  head_name = head_tensor_name(reader, "")
  if hf_config.get("tie_word_embeddings", False) or not reader.has(head_name):
    head = reader.cast(np.asarray(embed).T)
    if reader.has(head_name):  # a tied checkpoint may still store the copy
      reader.take(head_name, shape)
  else:
    head = reader.cast(reader.take(head_name, shape).T)
  params = {
    "token_embed": {"embedding": embed},
    "decoder": stack_from_hf(reader, "gpt_neox.", config.stack),
    "lm_head": {"kernel": head},
  }
  reader.check_all_used(lambda name: name.endswith(SKIPPED_SUFFIXES))
  return params


def vanilla_params_to_hf(
  params: Mapping, config: VanillaConfig
) -> dict[str, Callable[[], np.ndarray]]:
  """HF tensor name -> function making it, for a GPTNeoXForCausalLM (untied head)."""
  out = {"gpt_neox.embed_in.weight": lambda: np.asarray(params["token_embed"]["embedding"])}
  out.update(stack_to_hf(params["decoder"], "gpt_neox.", config.stack))
  out["embed_out.weight"] = lambda: np.asarray(params["lm_head"]["kernel"]).T
  return out
