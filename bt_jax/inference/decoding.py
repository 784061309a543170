"""Prefill and one decode step for each model, on explicit caches.

A decoder exposes
  tokens_per_step         1 (vanilla) or L_B (block: one block per step)
  prefill(params, tokens, pad, num_steps) -> carry
  step(params, carry, step, pad, sample, keep_logits, read_slots) -> (tokens, logits, carry)
where tokens [batch, prompt_len] are left-padded (pad [batch] masked slots per
row), `sample(logits [batch, vocab], j) -> ids [batch]` picks the j-th token of
the step, and step returns tokens [batch, tokens_per_step], their logits
[batch, tokens_per_step, vocab] (None unless keep_logits) and the new carry.
read_slots (static) bounds the global-cache slots the step's attention reads:
the loop may run in segments, each reading only the part of the cache it can
have filled. The carry is a pytree (caches included), so the generation loop
is `lax.while_loop`s over `step`.

Every cached model call gets the mask and, for a single-query step, the
window it was built from (`caches.padded_window` / `local_window`), so the
attention can run the decode kernel without re-deriving it from the mask.

Sharded generation: a decoder made with a `mesh` keeps the global cache (the
vanilla cache, the block decoder's cache) sharded over the mesh's `sequence`
axis in round-robin slot order, attended by Tree Attention: it passes its
`ShardedKVCache` (`self.sharding`) to the model calls that use the global
cache (`bt_jax.distributed.sharded_cache`); the Block Transformer's token decoder
and its local cache stay unsharded. `align_prompt` left-pads a batch so that
the global cache splits evenly over the devices. A mesh with a `data` axis
also splits the rows over it (caches, local caches and per-row state alike).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bt_jax import axes
from bt_jax.config import BlockConfig, VanillaConfig
from bt_jax.distributed.sharded_cache import ShardedKVCache
from bt_jax.inference import caches as caches_lib
from bt_jax.models.block import BlockTransformer
from bt_jax.models.vanilla import VanillaLM

Sampler = Callable[[jax.Array, int], jax.Array]


class _GlobalCache:
  """What the two decoders share: the global cache, sharded or not."""

  tokens_per_step: int  # also the tokens per global-cache slot

  def __init__(self, mesh: Optional[Mesh]):
    # Checks the mesh now (a missing axis is a ValueError), not at trace time.
    # A mesh with a `data` axis also splits the rows over it.
    self.sharding = None
    if mesh is not None:
      batch_axis = axes.MESH_DATA if axes.MESH_DATA in mesh.axis_names else None
      self.sharding = ShardedKVCache(mesh, batch_axis=batch_axis)

  @staticmethod
  def cache_len(carry) -> int:
    """Slots of the global cache (static)."""
    return carry["cache"][0]["key"].shape[1]

  def constrain_rows(self, tree):
    """Per-row arrays ([batch, ...]) split over the mesh's data axis, if any;
    checks that the batch splits evenly. Unsharded, or without a data axis: as is."""
    if self.sharding is None or self.sharding.batch_axis is None:
      return tree

    def constrain(x):
      self.sharding.check_batch(x.shape[0])
      return jax.lax.with_sharding_constraint(x, self.sharding.rows_sharding)

    return jax.tree.map(constrain, tree)

  def move_slots(self, cache, source: jax.Array, start: jax.Array):
    """Every layer's global cache with slots start[b] .. start[b] + n - 1 of
    row b holding what slots source[b, :n] held (logical slots; source and
    targets may overlap: all are read first). Sharded, only the moved
    entries travel between devices (`ShardedKVCache.move_slots`)."""
    targets = start[:, None] + jnp.arange(source.shape[1])[None, :]

    def move(array):
      if self.sharding is not None:
        return self.sharding.move_slots(array, source, targets)
      taken = jax.vmap(lambda c, s: jnp.take(c, s, axis=0))(array, source)
      return jax.vmap(lambda c, t, i: jax.lax.dynamic_update_slice_in_dim(c, t, i, axis=0))(
        array, taken, start
      )

    return jax.tree.map(move, cache)

  def _init_global_cache(self, stack, batch: int, cache_len: int):
    cache = caches_lib.init_stack_cache(stack, batch, cache_len, self.config.compute_dtype)
    if self.sharding is not None:
      cache = jax.lax.with_sharding_constraint(cache, self.sharding.cache_sharding)
    return cache

  def align_prompt(
    self, tokens: jax.Array, pad: jax.Array, num_steps: int
  ) -> Tuple[jax.Array, jax.Array]:
    """Left-pads (masked) so that the global cache splits evenly; unsharded: as is.

    The cache holds the prompt's slots and num_steps more; with p devices the
    prompt gets up to p - 1 more masked pad slots in front, which leaves every
    row's result unchanged (see `caches`) and keeps the slots read by a
    segment exact.
    """
    if self.sharding is None:
      return tokens, pad
    slot_tokens = self.tokens_per_step
    slots = tokens.shape[1] // slot_tokens + num_steps
    extra = (self.sharding.padded_cache_len(slots) - slots) * slot_tokens
    tokens = jnp.pad(tokens, ((0, 0), (extra, 0)), constant_values=self.config.pad_id)
    return tokens, pad + extra


class VanillaDecoder(_GlobalCache):
  """Vanilla LM: one preallocated KV cache per layer, one token per step."""

  tokens_per_step = 1

  def __init__(self, model: VanillaLM, mesh: Optional[Mesh] = None):
    super().__init__(mesh)
    self.model = model
    self.config: VanillaConfig = model.config

  def _apply(self, params, *args, window=None):
    return self.model.apply(
      {"params": params}, *args, method=VanillaLM.decode, window=window, sharding=self.sharding
    )

  def apply_decode(self, params, *args, window=None):
    """`VanillaLM.decode(*args, window=window)` on this decoder's global cache
    (sharded over the mesh's `sequence` axis when it has a mesh): for callers
    that drive the cache themselves, like ReDrafter's verify step."""
    return self._apply(params, *args, window=window)

  def prefill(
    self, params, tokens: jax.Array, pad: jax.Array, num_steps: int, return_hidden: bool = False
  ):
    """One pass over the prompt fills slots [0, prompt_len); the cache has
    room for num_steps more. carry: next-token logits and the cache (and with
    return_hidden the last position's final-norm hidden state, what a
    ReDrafter draft head reads)."""
    batch, prompt_len = tokens.shape
    cache_len = prompt_len + num_steps
    cache = self._init_global_cache(self.config.stack, batch, cache_len)
    slots = jnp.arange(prompt_len)
    positions = slots[None, :] - pad[:, None]
    mask = caches_lib.padded_mask(pad, slots, cache_len)
    out = self._apply(params, tokens, positions, cache, 0, mask, True, return_hidden)
    carry = {"logits": out[0][:, -1], "cache": out[1], "prompt_len": jnp.int32(prompt_len)}
    if return_hidden:
      carry["hidden"] = out[2][:, -1]
    return carry

  def step(self, params, carry, step, pad, sample: Sampler, keep_logits: bool, read_slots: int):
    logits = carry["logits"]  # [batch, vocab]
    token = sample(logits, 0)
    cache = carry["cache"]
    slot = carry["prompt_len"] + step
    positions = (slot - pad)[:, None]
    mask = caches_lib.padded_mask(pad, slot[None], read_slots)
    window = caches_lib.padded_window(pad, slot, read_slots)
    next_logits, cache = self._apply(
      params, token[:, None], positions, cache, slot, mask, window=window
    )
    new_carry = {"logits": next_logits[:, 0], "cache": cache, "prompt_len": carry["prompt_len"]}
    return token[:, None], (logits[:, None] if keep_logits else None), new_carry


class BlockDecoder(_GlobalCache):
  """Block Transformer (docs/inference.md).

  Global cache: the block decoder's, one slot per block. Per new block: the
  last context embedding is expanded, the token decoder runs on a fresh local
  cache of `token_decoder_len` slots (one pass over the P prefix vectors, then
  L_B - 1 single-token steps, at the training positions), and the new block is
  embedded and appended to the global cache by one block-decoder step.
  """

  def __init__(self, model: BlockTransformer, mesh: Optional[Mesh] = None):
    super().__init__(mesh)
    self.model = model
    self.config: BlockConfig = model.config
    self.tokens_per_step = self.config.block_len

  def _apply(self, params, method, *args):
    return self.model.apply({"params": params}, *args, method=method)

  def _encode_blocks(self, params, *args, window=None):
    """The embedder and block decoder: the only users of the global cache."""
    return self.model.apply(
      {"params": params},
      *args,
      method=BlockTransformer.encode_blocks,
      window=window,
      sharding=self.sharding,
    )

  def prefill(self, params, tokens: jax.Array, pad: jax.Array, num_steps: int):
    """tokens [batch, prompt_len] with prompt_len a multiple of L_B and pad a
    multiple of L_B. One block-decoder pass fills the global cache; prompt
    tokens never go through the token decoder. carry: the last context
    embedding and the block cache."""
    cfg = self.config
    batch, prompt_len = tokens.shape
    num_blocks = prompt_len // cfg.block_len
    blocks = tokens.reshape(batch, num_blocks, cfg.block_len)
    pad_blocks = pad // cfg.block_len
    cache_len = num_blocks + num_steps
    cache = self._init_global_cache(cfg.block_stack, batch, cache_len)
    slots = jnp.arange(num_blocks)
    positions = slots[None, :] - pad_blocks[:, None]
    mask = caches_lib.padded_mask(pad_blocks, slots, cache_len)
    context, cache = self._encode_blocks(params, blocks, positions, cache, 0, mask)
    return {"context": context[:, -1], "cache": cache, "prompt_blocks": jnp.int32(num_blocks)}

  def _decode_block(self, params, context, sample: Sampler, keep_logits: bool):
    """The token decoder: context [batch, block_width] -> L_B tokens (and logits)."""
    cfg = self.config
    batch = context.shape[0]
    block_len, local_len = cfg.block_len, cfg.token_decoder_len
    expanded = self._apply(params, BlockTransformer.expand, context)  # [batch, E, width]
    local = self.constrain_rows(
      caches_lib.init_stack_cache(cfg.token_stack, batch, local_len, cfg.compute_dtype)
    )
    memory = None
    if cfg.token_decoder == "prefix":
      first = expanded  # positions 0 .. P-1
    else:
      bos = self._apply(
        params, BlockTransformer.embed_tokens, jnp.full((batch, 1), cfg.bos_id, jnp.int32)
      )
      if cfg.token_decoder == "summation":
        first = bos + expanded[:, :1]
      else:
        first, memory = bos, expanded
    first_len = first.shape[1]
    first_slots = jnp.arange(first_len)
    # One query at slot 0 (summation, cross_attention) is a decode step; more
    # (the prefix) a prefill, which needs no window.
    first_window = caches_lib.local_window(batch, 0, local_len) if first_len == 1 else None
    logits, local = self._apply(
      params,
      BlockTransformer.token_step,
      first,
      first_slots,
      local,
      0,
      caches_lib.local_mask(first_slots, local_len),
      memory,
      True,
      first_window,
    )
    token = sample(logits[:, -1], 0)
    tokens = jnp.zeros((batch, block_len), jnp.int32).at[:, 0].set(token)
    all_logits = None
    if keep_logits:
      all_logits = jnp.zeros((batch, block_len, cfg.vocab_size), jnp.float32)
      all_logits = all_logits.at[:, 0].set(logits[:, -1])

    def body(j, loop_carry):
      tokens, all_logits, local = loop_carry
      prev = jax.lax.dynamic_slice_in_dim(tokens, j - 1, 1, axis=1)  # [batch, 1]
      x = self._apply(params, BlockTransformer.embed_tokens, prev)
      if cfg.token_decoder == "summation":
        x = x + jax.lax.dynamic_slice_in_dim(expanded, j, 1, axis=1)
      slot = first_len - 1 + j  # = the training position
      logits, local = self._apply(
        params,
        BlockTransformer.token_step,
        x,
        slot[None],
        local,
        slot,
        caches_lib.local_mask(slot[None], local_len),
        memory,
        False,
        caches_lib.local_window(batch, slot, local_len),
      )
      token = sample(logits[:, 0], j)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], j, axis=1)
      if keep_logits:
        all_logits = jax.lax.dynamic_update_slice_in_dim(all_logits, logits, j, axis=1)
      return tokens, all_logits, local

    if block_len > 1:
      tokens, all_logits, _ = jax.lax.fori_loop(1, block_len, body, (tokens, all_logits, local))
    return tokens, all_logits

  def step(self, params, carry, step, pad, sample: Sampler, keep_logits: bool, read_slots: int):
    cfg = self.config
    tokens, logits = self._decode_block(params, carry["context"], sample, keep_logits)
    cache = carry["cache"]
    pad_blocks = pad // cfg.block_len
    slot = carry["prompt_blocks"] + step
    positions = (slot - pad_blocks)[:, None]
    mask = caches_lib.padded_mask(pad_blocks, slot[None], read_slots)
    window = caches_lib.padded_window(pad_blocks, slot, read_slots)
    context, cache = self._encode_blocks(
      params, tokens[:, None, :], positions, cache, slot, mask, window=window
    )
    new_carry = {"context": context[:, 0], "cache": cache, "prompt_blocks": carry["prompt_blocks"]}
    return tokens, logits, new_carry


def decoder_for(model: nn.Module, mesh: Optional[Mesh] = None):
  """The decoder of `model`; with a mesh, its global cache is sharded over the
  mesh's `sequence` axis."""
  if isinstance(model, BlockTransformer):
    return BlockDecoder(model, mesh)
  if isinstance(model, VanillaLM):
    return VanillaDecoder(model, mesh)
  raise TypeError(
    f"no decoder for {type(model).__name__}; valid models are VanillaLM and BlockTransformer"
  )
