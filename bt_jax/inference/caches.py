"""KV caches as plain pytrees, and the masks that go with left padding.

A stack's cache is a list (one entry per layer) of {"key", "value"} arrays
[batch, cache_len, heads, head_dim] in the compute dtype, preallocated and
written in place with `dynamic_update_slice` (`bt_jax.layers.Attention`).

Layouts:
  vanilla:  one cache of prompt_len + max_new_tokens slots per layer.
  block:    the global block-decoder cache of prompt_blocks + new_blocks slots
            (one slot per block), and the token-decoder cache of
            `token_decoder_len` slots (P + L_B - 1 for the prefix decoder),
            made fresh for every new block.

Left padding: all rows of a batch end their prompt at the same slot. A row's
first `pad` slots are masked out of every query's view and its positions
start at 0 on its first real slot (position = slot - pad), so a padded row
computes exactly what it would alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bt_jax.config import BlockConfig, ModelConfig, StackConfig

Cache = list  # [{"key": [batch, len, heads, head_dim], "value": ...}] per layer


def init_stack_cache(stack: StackConfig, batch: int, length: int, dtype) -> Cache:
  """Zeros for every layer of `stack`."""
  shape = (batch, length, stack.num_heads, stack.resolved_head_dim)
  return [
    {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
    for _ in range(stack.num_layers)
  ]


def cache_bytes(tree: Any) -> int:
  """Bytes of a cache pytree (arrays or ShapeDtypeStructs)."""
  return int(
    sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
  )


def stack_cache_bytes_per_slot(stack: StackConfig, dtype) -> int:
  """Key + value bytes one position adds to one row of a stack's cache."""
  return 2 * stack.num_layers * stack.width * np.dtype(dtype).itemsize


def kv_cache_bytes_per_sample(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int:
  """Bytes of the preallocated caches of one row (what `generate` allocates).

  prompt_len is in tokens, already left-padded to a multiple of L_B for block models.
  """
  dtype = config.compute_dtype
  if isinstance(config, BlockConfig):
    blocks = prompt_len // config.block_len + config.num_steps(max_new_tokens)
    return blocks * stack_cache_bytes_per_slot(
      config.block_stack, dtype
    ) + config.token_decoder_len * stack_cache_bytes_per_slot(config.token_stack, dtype)
  return (prompt_len + max_new_tokens) * stack_cache_bytes_per_slot(config.stack, dtype)


def padded_mask(pad: jax.Array, query_slots: jax.Array, cache_len: int) -> jax.Array:
  """Which cache slots each query sees: [batch, q, cache_len] bool.

  pad [batch]: masked left slots per row; query_slots [q]: the cache slot of
  each query. A query sees slots in [pad, its own slot] (causal).
  """
  slots = jnp.arange(cache_len)
  causal = slots[None, :] <= query_slots[:, None]  # [q, cache_len]
  return causal[None] & (slots[None, None, :] >= pad[:, None, None])


def local_mask(query_slots: jax.Array, cache_len: int) -> jax.Array:
  """Causal view of the token-decoder cache, shared by every row: [1, q, cache_len]."""
  return (jnp.arange(cache_len)[None, :] <= query_slots[:, None])[None]


# Windows: the run of slots [starts, ends) each row sees, int32 [batch] each,
# handed to the attention beside the mask it agrees with (the decode kernel
# reads the window, not the mask; see `bt_jax.attention`). `ends` is an
# exclusive end slot.


def padded_window(pad: jax.Array, query_slot: jax.Array, read_len: int):
  """The window of `padded_mask(pad, query_slot[None], read_len)`: one query at
  slot query_slot (a scalar) sees [pad, query_slot] within the read_len slots."""
  ends = jnp.minimum(jnp.asarray(query_slot, jnp.int32) + 1, read_len)
  return pad.astype(jnp.int32), jnp.broadcast_to(ends, pad.shape).astype(jnp.int32)


def local_window(batch: int, query_slot: jax.Array, cache_len: int):
  """The window of `local_mask(query_slot[None], cache_len)` for each of batch rows."""
  ends = jnp.minimum(jnp.asarray(query_slot, jnp.int32) + 1, cache_len)
  return jnp.zeros((batch,), jnp.int32), jnp.broadcast_to(ends, (batch,)).astype(jnp.int32)
