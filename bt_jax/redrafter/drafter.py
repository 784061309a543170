"""The ReDrafter draft head (spec: ../shared/spec/redrafter.md, "Draft head").

    s_0 = 0
    s_t = SiLU(W E(x_{t-1}) + U s_{t-1} + b)       x_0 = g_0, W without bias
    z_t = ResBlocks([h ; s_t])  then  Linear(2H -> V, no bias)
    ResBlock(x) = x + SiLU(Linear(x))

h is the base LM's final-norm hidden state at the last committed position,
g_0 the token it just produced, E the base LM's frozen input embedding table
(passed in, never trained here). The vocabulary projection is the drafter's
own. The drafter keeps no state between decoding steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """Sizes of a draft head for a base LM of hidden width `hidden_dim`."""

  vocab_size: int
  hidden_dim: int          # H: the base LM's hidden width (h) and the RNN state size
  embed_dim: int           # the base LM's token-embedding width (E)
  num_res_blocks: int = 2  # the recipe's
  draft_len: int = 4       # C: tokens drafted after g_0 (and trained to predict)

  def __post_init__(self):
    for name in ("vocab_size", "hidden_dim", "embed_dim", "draft_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DrafterConfig.{name} must be positive; got {getattr(self, name)}")
    if self.num_res_blocks < 0:
      raise ValueError(f"DrafterConfig.num_res_blocks must be >= 0; got {self.num_res_blocks}")

  @classmethod
  def for_base(cls, base_config, **kwargs) -> "DrafterConfig":
    """A drafter for a vanilla base LM config (hidden and embedding width = width)."""
    return cls(vocab_size=base_config.vocab_size, hidden_dim=base_config.width,
               embed_dim=base_config.width, **kwargs)


class DraftHead(nn.Module):
  """The recurrent drafter: `step` advances the RNN, `logits` reads it out."""

  config: DrafterConfig

  def setup(self):
    cfg = self.config
    self.w = nn.Dense(cfg.hidden_dim, use_bias=False, name="w")   # on E(x)
    self.u = nn.Dense(cfg.hidden_dim, use_bias=True, name="u")    # on s (its bias is b)
    self.res = [nn.Dense(2 * cfg.hidden_dim, name=f"res_{i}") for i in range(cfg.num_res_blocks)]
    self.head = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")

  def step(self, state: jax.Array, token_embedding: jax.Array) -> jax.Array:
    """s_t from s_{t-1} [..., H] and E(x_{t-1}) [..., E]."""
    return nn.silu(self.w(token_embedding) + self.u(state))

  def logits(self, hidden: jax.Array, state: jax.Array) -> jax.Array:
    """f32 logits [..., V] of the next draft token from h [..., H] and s_t [..., H]."""
    z = jnp.concatenate([hidden, state], axis=-1)
    for block in self.res:
      z = z + nn.silu(block(z))
    return self.head(z).astype(jnp.float32)

  def __call__(self, hidden: jax.Array, input_embeddings: jax.Array) -> jax.Array:
    """Teacher forcing: hidden [..., H] and the embeddings of x_0 .. x_{n-1}
    [..., n, E] -> logits [..., n, V] of x_1 .. x_n."""
    state = jnp.zeros(hidden.shape[:-1] + (self.config.hidden_dim,), hidden.dtype)
    out = []
    for t in range(input_embeddings.shape[-2]):
      state = self.step(state, input_embeddings[..., t, :])
      out.append(self.logits(hidden, state))
    return jnp.stack(out, axis=-2)


def init_drafter(drafter: DraftHead, rng: jax.Array) -> Any:
  cfg = drafter.config
  hidden = jnp.zeros((1, cfg.hidden_dim))
  embeddings = jnp.zeros((1, 1, cfg.embed_dim))
  return jax.jit(drafter.init)(rng, hidden, embeddings)["params"]


def teacher_forcing_loss(drafter: DraftHead, params, hidden: jax.Array, embed_table: jax.Array,
                         tokens: jax.Array, mask: jax.Array):
  """The released recipe's loss (spec "Training"), over every position at once.

  hidden [B, T, H]: the frozen base LM's hidden states of tokens [B, T]
  (mask [B, T] 1 = real token). At position t, h_t and the embeddings of
  tokens t+1, t+2, ... drive the RNN; step i predicts token t+2+i, for
  i < draft_len. Returns (sum over i of the mean cross-entropy of step i,
  {"loss_i": [C], "acc_i": [C] top-1 accuracy, "count_i": [C]}).
  """
  cfg = drafter.config
  num_steps = cfg.draft_len
  batch, length = tokens.shape
  padded = jnp.pad(tokens, ((0, 0), (0, num_steps + 2)))
  valid_pad = jnp.pad(mask.astype(bool), ((0, 0), (0, num_steps + 2)))
  # x_i = token t+1+i (i = 0 .. C-1), the target of step i is token t+2+i.
  inputs = jnp.stack([padded[:, 1 + i:1 + i + length] for i in range(num_steps)], axis=2)
  targets = jnp.stack([padded[:, 2 + i:2 + i + length] for i in range(num_steps)], axis=2)
  valid = jnp.stack([valid_pad[:, 2 + i:2 + i + length] for i in range(num_steps)], axis=2)
  valid &= mask.astype(bool)[:, :, None]
  embeddings = jnp.take(embed_table, inputs, axis=0)                 # [B, T, C, E]
  logits = drafter.apply({"params": params}, jax.lax.stop_gradient(hidden),
                         jax.lax.stop_gradient(embeddings))           # [B, T, C, V]
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = valid.astype(jnp.float32)
  count = jnp.sum(weights, axis=(0, 1))
  loss_i = jnp.sum(xent * weights, axis=(0, 1)) / jnp.maximum(count, 1.0)
  acc_i = jnp.sum((jnp.argmax(logits, -1) == targets) * weights, axis=(0, 1)) / jnp.maximum(
      count, 1.0)
  return jnp.sum(loss_i), {"loss_i": loss_i, "acc_i": acc_i, "count_i": count}
