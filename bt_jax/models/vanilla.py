"""The vanilla decoder-only GPT-NeoX LM (the baseline)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bt_jax import axes
from bt_jax.config import VanillaConfig
from bt_jax.layers import DecoderStack, Embed, normal_init
from bt_jax.models.common import check_token_ids


class VanillaLM(nn.Module):
  """token embedding -> GPT-NeoX stack -> final LayerNorm -> untied head."""

  config: VanillaConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.token_embed = Embed(
      cfg.vocab_size,
      cfg.width,
      name="token_embed",
      embedding_init=normal_init(cfg.init_std, (axes.VOCAB, axes.EMBED)),
      **kw,
    )
    self.decoder = DecoderStack(
      cfg.stack,
      init_std=cfg.init_std,
      attention_impl=cfg.attention_impl,
      remat=cfg.remat,
      causal=True,
      name="decoder",
      **kw,
    )
    self.lm_head = nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      name="lm_head",
      kernel_init=normal_init(cfg.init_std, (axes.EMBED, axes.VOCAB)),
      **kw,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, length] -> f32 logits [batch, length, vocab]; logits[:, t] predicts t+1."""
    check_token_ids(tokens, self.config.vocab_size)
    x = self.token_embed(tokens)  # [batch, length, embed]
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    hidden = self.decoder(x, jnp.arange(tokens.shape[1]))
    logits = self.lm_head(hidden)
    logits = nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
    return logits.astype(jnp.float32)

  def decode(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    caches,
    cache_index,
    mask: jax.Array,
    last_only: bool = False,
    return_hidden: bool = False,
    window=None,
    sharding=None,
  ):
    """Cached forward (inference): prefill or one step.

    tokens [batch, q] are written at cache slots cache_index .. cache_index + q - 1
    (cache_index a scalar, or int32 [batch]: a slot per row); positions
    [batch, q] are their token positions (slot minus the row's left pad); mask
    [batch, q, cache_len] says which cache slots each query sees.
    caches: one {"key", "value"} [batch, cache_len, heads, head_dim] per layer.
    Returns (f32 logits [batch, q, vocab], new caches); with last_only the
    logits of the last query only ([batch, 1, vocab]: a prefill needs no more);
    with return_hidden also the final-norm hidden states of those queries
    (what a ReDrafter draft head reads), as a third element. window
    (starts, ends) int32 [batch], the run of slots each row sees, and
    sharding (a ShardedKVCache) go to every layer's attention
    (`bt_jax.attention.attend`).
    """
    x = self.token_embed(tokens)
    hidden, caches = self.decoder(
      x,
      positions,
      mask=mask,
      caches=caches,
      cache_index=cache_index,
      window=window,
      sharding=sharding,
    )
    if last_only:
      hidden = hidden[:, -1:]
    logits = self.lm_head(hidden).astype(jnp.float32)
    return (logits, caches, hidden) if return_hidden else (logits, caches)

  def hidden_states(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, length] -> final-norm hidden states [batch, length, width]
    (training a draft head on a frozen base model)."""
    check_token_ids(tokens, self.config.vocab_size)
    x = self.token_embed(tokens)
    return self.decoder(x, jnp.arange(tokens.shape[1]))
