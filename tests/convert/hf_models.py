"""Tiny random GPT-NeoX models saved as local Hugging Face folders (no downloads)."""

from __future__ import annotations

import json
import os

import torch
import transformers

from bt_jax.data.tokenizer import train_bpe

TEXTS = [
  "The quick brown fox jumps over the lazy dog. " * 3,
  "Question: What do plants need to grow?\nAnswer: sunlight, water and soil.",
  "A man is sitting on a roof. He starts pulling up roofing on a roof.",
  "def f(x):\n  return x * 2  # doubles the input",
]
TOKENIZER_VOCAB = 300


def tokenizer(vocab_size: int = TOKENIZER_VOCAB):
  return train_bpe(TEXTS * 4, vocab_size=vocab_size)


def gpt_neox_config(**overrides) -> transformers.GPTNeoXConfig:
  """2 layers, 2 heads x 64, vocab padded beyond the tokenizer (as Pythia's 50304 > 50277)."""
  fields = dict(
    vocab_size=320,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=512,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=64,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    hidden_act="gelu",
    attention_dropout=0.0,
    hidden_dropout=0.0,
  )
  fields.update(overrides)
  return transformers.GPTNeoXConfig(**fields)


def save_hf_model(
  folder: str, config: transformers.GPTNeoXConfig, seed: int = 0, safe: bool = True
) -> transformers.GPTNeoXForCausalLM:
  """A random float32 GPTNeoXForCausalLM with non-trivial norms and biases, plus
  tokenizer files, saved in `folder` the way save_pretrained does."""
  torch.manual_seed(seed)
  model = transformers.GPTNeoXForCausalLM(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layernorm" in name or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  if not safe:  # the older pickle format (transformers 5 writes safetensors only)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    os.remove(os.path.join(folder, "model.safetensors"))
  tok = tokenizer()
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "GPTNeoXTokenizer",
        "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": config.max_position_embeddings,
        "add_bos_token": False,
        "add_eos_token": False,
      },
      f,
    )
  return model


def jitted(fn, model, params, ids):
  """fn(model, params, ids) under one jit: eager flax dispatch compiles every op
  on its own, which costs far more than one compile on these tiny models."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.jit(lambda p, t: fn(model, p, t))(params, ids)
