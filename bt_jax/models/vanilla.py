"""The vanilla decoder-only GPT-NeoX LM (the baseline)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bt_jax import axes
from bt_jax.config import VanillaConfig
from bt_jax.layers import DecoderStack, normal_init
from bt_jax.models.common import check_token_ids


class VanillaLM(nn.Module):
  """token embedding -> GPT-NeoX stack -> final LayerNorm -> untied head."""

  config: VanillaConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.token_embed = nn.Embed(cfg.vocab_size, cfg.width, name="token_embed",
                                embedding_init=normal_init(cfg.init_std, (axes.VOCAB, axes.EMBED)),
                                **kw)
    self.decoder = DecoderStack(cfg.stack, init_std=cfg.init_std,
                                attention_impl=cfg.attention_impl, causal=True, name="decoder",
                                **kw)
    self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head",
                            kernel_init=normal_init(cfg.init_std, (axes.EMBED, axes.VOCAB)), **kw)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, length] -> f32 logits [batch, length, vocab]; logits[:, t] predicts t+1."""
    check_token_ids(tokens, self.config.vocab_size)
    x = self.token_embed(tokens)                       # [batch, length, embed]
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    hidden = self.decoder(x, jnp.arange(tokens.shape[1]))
    logits = self.lm_head(hidden)
    logits = nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
    return logits.astype(jnp.float32)
