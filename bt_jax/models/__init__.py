"""Models and the one scoring function shared by training, eval and perplexity.

model = build_model(config)
params = init_params(model, jax.random.key(0))
loss, aux = sequence_loss(model, params, tokens, mask)
logprobs, valid = token_logprobs(model, params, tokens, mask)
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bt_jax.config import BlockConfig, ModelConfig
from bt_jax.models.block import BlockTransformer, Embedder
from bt_jax.models.common import check_token_ids
from bt_jax.models.vanilla import VanillaLM

__all__ = [
  "BlockTransformer",
  "Embedder",
  "MODELS",
  "VanillaLM",
  "build_model",
  "init_params",
  "abstract_params",
  "native_logprobs",
  "sequence_loss",
  "token_logprobs",
]


# One model class per `config.kind`.
MODELS: dict[str, type[nn.Module]] = {"vanilla": VanillaLM, "block": BlockTransformer}


def build_model(config: ModelConfig) -> nn.Module:
  model_cls = MODELS.get(getattr(config, "kind", None))
  if model_cls is None:
    raise TypeError(
      f"unknown model config type {type(config).__name__}; valid types are "
      "VanillaConfig and BlockConfig"
    )
  return model_cls(config)


def _init_fn(model: nn.Module, rng: jax.Array):
  tokens = jnp.zeros((1, model.config.init_length), jnp.int32)
  return model.init(rng, tokens)["params"]


def init_params(model: nn.Module, rng: jax.Array, *, unbox: bool = True) -> Any:
  """Jitted init. With unbox=False the logical-axis metadata boxes are kept."""
  params = jax.jit(functools.partial(_init_fn, model))(rng)
  return nn.unbox(params) if unbox else params


def abstract_params(model: nn.Module, *, unbox: bool = True) -> Any:
  """ShapeDtypeStructs of the parameters, without allocating any weights."""
  params = jax.eval_shape(functools.partial(_init_fn, model), jax.random.key(0))
  return nn.unbox(params) if unbox else params


def _gather_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[targets] in f32, without materialising the full log-softmax."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def native_logprobs(model: nn.Module, params: Any, tokens: jax.Array):
  """Per-token log-probs in the model's own alignment, no padding added.

  Returns (logprobs [batch, length] f32, scorable [length] bool): logprobs[:, t]
  is log p(tokens[:, t] | tokens[:, :t]) where scorable[t]. Vanilla scores
  t >= 1; a block model scores blocks 1..N-1 (t >= block_len), block 0 is never
  a target.
  """
  logits = model.apply({"params": params}, tokens)
  batch, length = tokens.shape
  if isinstance(model.config, BlockConfig):
    block_len = model.config.block_len
    targets = tokens[:, block_len:].reshape(logits.shape[:3])
    scored = _gather_logprobs(logits, targets).reshape(batch, length - block_len)
    logprobs = jnp.concatenate([jnp.zeros((batch, block_len), jnp.float32), scored], axis=1)
    scorable = jnp.arange(length) >= block_len
  else:
    scored = _gather_logprobs(logits[:, :-1], tokens[:, 1:])
    logprobs = jnp.concatenate([jnp.zeros((batch, 1), jnp.float32), scored], axis=1)
    scorable = jnp.arange(length) >= 1
  return logprobs, scorable


def _check_batch(model: nn.Module, tokens, mask) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
  if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
    raise ValueError(
      f"mask shape {tuple(mask.shape)} differs from tokens shape {tuple(tokens.shape)}"
    )
  check_token_ids(tokens, model.config.vocab_size)


def sequence_loss(model: nn.Module, params: Any, tokens: jax.Array, mask: jax.Array):
  """The training loss: mean next-token cross-entropy over valid target tokens.

  Valid targets have mask 1 (EOS included, pads excluded) and are scorable in
  the model's alignment (block 0 is never a target). Returns (loss, aux) with
  aux = {"token_nll": [batch, length], "weights": [batch, length], "num_tokens": scalar}.
  """
  _check_batch(model, tokens, mask)
  if tokens.shape[1] > model.config.max_len:
    raise ValueError(
      f"sequence length {tokens.shape[1]} exceeds the model's max_len {model.config.max_len}"
    )
  logprobs, scorable = native_logprobs(model, params, tokens)
  weights = (mask > 0) & scorable[None, :]
  weights = weights.astype(jnp.float32)
  num_tokens = jnp.sum(weights)
  token_nll = -logprobs * weights
  loss = jnp.sum(token_nll) / jnp.maximum(num_tokens, 1.0)
  return loss, {"token_nll": token_nll, "weights": weights, "num_tokens": num_tokens}


def block_aligned(
  tokens: jax.Array, mask: jax.Array, block_len: int, pad_id: int, left_pad: bool = True
):
  """Spec section 6: prepend L-1 pads, right-pad to a block boundary.

  The first right pad after each row's last real token gets attention 1 (the
  pseudo-EOS of training). Returns (aligned_tokens, aligned_mask); original
  position t sits at aligned position t + L - 1. With left_pad=False (the
  `eval_no_pad` scoring of the released >= 300M official checkpoints) no pads
  are prepended: position t stays at t, and tokens t < L (block 0) get no score.
  """
  batch, length = tokens.shape
  shift = block_len - 1 if left_pad else 0
  total = -(-(length + shift) // block_len) * block_len
  # Always leave room for at least one right pad (the pseudo-EOS).
  if total == length + shift:
    total += block_len
  left = jnp.full((batch, shift), pad_id, tokens.dtype)
  right = jnp.full((batch, total - length - shift), pad_id, tokens.dtype)
  aligned = jnp.concatenate([left, tokens, right], axis=1)
  real = jnp.concatenate(
    [
      jnp.zeros((batch, shift), jnp.int32),
      (mask > 0).astype(jnp.int32),
      jnp.zeros(right.shape, jnp.int32),
    ],
    axis=1,
  )
  lengths = jnp.sum(mask > 0, axis=1) + shift
  pseudo_eos = (jnp.arange(total)[None, :] == lengths[:, None]).astype(jnp.int32)
  return aligned, real | pseudo_eos


def token_logprobs(
  model: nn.Module, params: Any, tokens: jax.Array, mask: Optional[jax.Array] = None
):
  """log p(tokens[b, t] | tokens[b, :t]) for vanilla and block models alike.

  tokens [batch, length] int, rows right-padded; mask [batch, length] is 1 on
  real tokens (all ones when None). Returns (logprobs [batch, length] f32,
  valid [batch, length] bool) with valid = mask & (t >= 1): every token except
  the first is scored. Block models use the padding alignment of the Block Transformer paper's evaluation;
  with `eval_no_pad` they score tokens t >= block_len only.
  """
  if mask is None:
    mask = jnp.ones(tokens.shape, jnp.int32)
  _check_batch(model, tokens, mask)
  config = model.config
  length = tokens.shape[1]
  if length > config.max_len:
    raise ValueError(
      f"sequence length {length} exceeds the model's context "
      f"(max_len {config.max_len}); truncate from the left"
    )
  valid = (mask > 0) & (jnp.arange(length) >= config.first_eval_position)[None, :]
  if isinstance(config, BlockConfig):
    aligned, _ = block_aligned(
      tokens, mask, config.block_len, config.pad_id, left_pad=not config.eval_no_pad
    )
    logprobs, _ = native_logprobs(model, params, aligned)
    start = 0 if config.eval_no_pad else config.block_len - 1
    logprobs = logprobs[:, start : start + length]
  else:
    logprobs, _ = native_logprobs(model, params, tokens)
  return jnp.where(valid, logprobs, 0.0), valid
