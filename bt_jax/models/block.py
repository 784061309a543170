"""The Block Transformer: embedder -> block decoder -> expansion -> token decoder.

Notation: L = block_len, N = length / L blocks, P = prefix_len. The block
decoder's output at block i (after its final LayerNorm) is the context
embedding that decodes block i + 1; block 0 is never a prediction target.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bt_jax import axes
from bt_jax.config import BlockConfig
from bt_jax.layers import DecoderStack, Embed, normal_init, zeros_init
from bt_jax.models.common import check_token_ids


class Embedder(nn.Module):
  """Turns each block of L token ids into one vector of width block_width."""

  config: BlockConfig

  @nn.compact
  def __call__(self, blocks: jax.Array) -> jax.Array:
    """blocks [batch, num_blocks, L] -> [batch, num_blocks, block_width]."""
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    batch, num_blocks, block_len = blocks.shape
    emb_init = normal_init(cfg.init_std, (axes.VOCAB, axes.EMBED))
    if cfg.embedder == "lookup":
      # Concatenate L embeddings of width block_width / L: no projection, no norm.
      table = Embed(
        cfg.vocab_size, cfg.block_width // block_len, embedding_init=emb_init, name="lookup", **kw
      )
      return table(blocks).reshape(batch, num_blocks, cfg.block_width)
    if cfg.embedder == "projection":
      table = Embed(
        cfg.vocab_size, cfg.block_width, embedding_init=emb_init, name="token_embed", **kw
      )
      flat = table(blocks).reshape(batch, num_blocks, block_len * cfg.block_width)
      return nn.Dense(
        cfg.block_width,
        name="projection",
        kernel_init=normal_init(cfg.init_std, (axes.MLP, axes.EMBED)),
        bias_init=zeros_init((axes.EMBED,)),
        **kw,
      )(flat)
    # encoder: a small bidirectional transformer over each block's tokens.
    table = Embed(
      cfg.vocab_size, cfg.encoder_width, embedding_init=emb_init, name="token_embed", **kw
    )
    x = table(blocks).reshape(batch * num_blocks, block_len, cfg.encoder_width)
    x = DecoderStack(
      cfg.encoder_stack,
      init_std=cfg.init_std,
      attention_impl=cfg.attention_impl,
      remat=cfg.remat,
      causal=False,
      name="encoder",
      **kw,
    )(x, jnp.arange(block_len))
    flat = x.reshape(batch, num_blocks, block_len * cfg.encoder_width)
    return nn.Dense(
      cfg.block_width,
      name="projection",
      kernel_init=normal_init(cfg.init_std, (axes.MLP, axes.EMBED)),
      bias_init=zeros_init((axes.EMBED,)),
      **kw,
    )(flat)


class BlockTransformer(nn.Module):
  config: BlockConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.embedder = Embedder(cfg, name="embedder")
    self.block_decoder = DecoderStack(
      cfg.block_stack,
      init_std=cfg.init_std,
      attention_impl=cfg.attention_impl,
      remat=cfg.remat,
      causal=True,
      name="block_decoder",
      **kw,
    )
    self.expansion = nn.Dense(
      cfg.num_expanded * cfg.token_width,
      name="expansion",
      kernel_init=normal_init(cfg.block_width**-0.5, (axes.EMBED, axes.MLP)),
      bias_init=zeros_init((axes.MLP,)),
      **kw,
    )
    self.token_embed = Embed(
      cfg.vocab_size,
      cfg.token_width,
      name="token_embed",
      embedding_init=normal_init(cfg.init_std, (axes.VOCAB, axes.EMBED)),
      **kw,
    )
    self.token_decoder = DecoderStack(
      cfg.token_stack,
      init_std=cfg.init_std,
      attention_impl=cfg.attention_impl,
      remat=cfg.remat,
      causal=True,
      cross_attention=cfg.token_decoder == "cross_attention",
      name="token_decoder",
      **kw,
    )
    self.lm_head = nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      name="lm_head",
      kernel_init=normal_init(cfg.init_std, (axes.EMBED, axes.VOCAB)),
      **kw,
    )

  def split_blocks(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, length] -> [batch, num_blocks, L], checking the length."""
    block_len = self.config.block_len
    batch, length = tokens.shape
    if length % block_len:
      raise ValueError(
        f"sequence length {length} is not a multiple of block_len {block_len}; valid lengths "
        f"are multiples of {block_len} (e.g. {length - length % block_len} or "
        f"{length + block_len - length % block_len})"
      )
    if length < 2 * block_len:
      raise ValueError(
        f"sequence length {length} gives no target block; it must be at least "
        f"2 * block_len = {2 * block_len}"
      )
    return tokens.reshape(batch, length // block_len, block_len)

  def context_embeddings(self, blocks: jax.Array) -> jax.Array:
    """blocks [batch, num_blocks, L] -> context embeddings [batch, num_blocks, block_width]."""
    x = self.embedder(blocks)
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.BLOCKS, axes.ACT_EMBED))
    return self.block_decoder(x, jnp.arange(blocks.shape[1]))

  def decode_blocks(self, context: jax.Array, blocks: jax.Array) -> jax.Array:
    """Token decoder for whole blocks (training / scoring).

    context [batch, m, block_width]: the context embedding of the block BEFORE
    each target block; blocks [batch, m, L]: the target blocks.
    Returns f32 logits [batch, m, L, vocab]; logits[:, i, j] predicts blocks[:, i, j].
    """
    cfg = self.config
    batch, m, block_len = blocks.shape
    width = cfg.token_width
    expanded = self.expansion(context).reshape(batch, m, cfg.num_expanded, width)
    memory = None
    if cfg.token_decoder == "prefix":
      # [p_1 .. p_P, e(t_0) .. e(t_{L-2})]; outputs at P-1 .. P+L-2 predict t_0 .. t_{L-1}.
      inputs = jnp.concatenate([expanded, self.token_embed(blocks[..., :-1])], axis=2)
    else:
      bos = jnp.full((batch, m, 1), cfg.bos_id, blocks.dtype)
      shifted = self.token_embed(jnp.concatenate([bos, blocks[..., :-1]], axis=2))
      if cfg.token_decoder == "summation":
        inputs = shifted + expanded
      else:  # cross_attention: every layer attends to the L expanded vectors.
        inputs = shifted
        memory = expanded.reshape(batch * m, block_len, width)
    seq = inputs.shape[2]
    if cfg.attention_impl in ("pallas", "pallas_interpret") and memory is None:
      # One long row per sequence, [batch, m * seq, width], with attention kept
      # inside each block by the kernel's local_block mask: no tiny sequences.
      # (cross_attention keeps the reshape below: its memory is per block.)
      inputs = inputs.reshape(batch, m * seq, width)
      positions = jnp.tile(jnp.arange(seq), m)  # training positions in each block
      hidden = self.token_decoder(inputs, positions, local_block=seq)
      hidden = hidden.reshape(batch, m, seq, width)[:, :, seq - block_len :]
    else:
      inputs = inputs.reshape(batch * m, seq, width)
      hidden = self.token_decoder(inputs, jnp.arange(seq), memory=memory)
      hidden = hidden[:, seq - block_len :]  # [batch*m, L, width]
    logits = self.lm_head(hidden).astype(jnp.float32)
    return logits.reshape(batch, m, block_len, cfg.vocab_size)

  # ---- Cached inference (bt_jax.inference, docs/inference.md). ----

  def encode_blocks(
    self,
    blocks: jax.Array,
    positions: jax.Array,
    caches,
    cache_index,
    mask: jax.Array,
    window=None,
    sharding=None,
  ):
    """Embedder + cached block decoder (prefill or one step).

    blocks [batch, n, L] go to block-cache slots cache_index .. cache_index + n - 1;
    positions [batch, n] are their block indices (slot minus the row's left-pad
    blocks); mask [batch, n, cache_len]; window and sharding as in
    `VanillaLM.decode`. Returns (context embeddings [batch, n, block_width],
    new block caches).
    """
    x = self.embedder(blocks)
    return self.block_decoder(
      x,
      positions,
      mask=mask,
      caches=caches,
      cache_index=cache_index,
      window=window,
      sharding=sharding,
    )

  def expand(self, context: jax.Array) -> jax.Array:
    """context [batch, block_width] -> [batch, num_expanded, token_width]."""
    cfg = self.config
    return self.expansion(context).reshape(context.shape[0], cfg.num_expanded, cfg.token_width)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The token decoder's embedding: [batch, q] -> [batch, q, token_width]."""
    return self.token_embed(tokens)

  def token_step(
    self,
    inputs: jax.Array,
    positions: jax.Array,
    caches,
    cache_index,
    mask: jax.Array,
    memory=None,
    last_only: bool = False,
    window=None,
  ):
    """Cached token decoder over input vectors [batch, q, token_width] at token
    positions [q] (the training positions 0 .. token_decoder_len - 1), written at
    local-cache slots cache_index ..; mask [1, q, token_decoder_len]; memory
    [batch, L, token_width] for cross_attention. Returns (f32 logits
    [batch, q, vocab] or, with last_only, [batch, 1, vocab]; new local caches).
    window: as in `VanillaLM.decode`."""
    hidden, caches = self.token_decoder(
      inputs,
      positions,
      memory=memory,
      mask=mask,
      caches=caches,
      cache_index=cache_index,
      window=window,
    )
    if last_only:
      hidden = hidden[:, -1:]
    return self.lm_head(hidden).astype(jnp.float32), caches

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, length] -> f32 logits [batch, num_blocks - 1, L, vocab] for blocks 1..N-1."""
    check_token_ids(tokens, self.config.vocab_size)
    blocks = self.split_blocks(tokens)
    context = self.context_embeddings(blocks)
    return self.decode_blocks(context[:, :-1], blocks[:, 1:])
