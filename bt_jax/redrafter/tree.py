"""Beam search over drafts and dynamic tree attention (spec "Beam search",
"Dynamic tree attention").

All functions work on one row unless named `batched_*`, and have static
shapes: beams [M, D] with D = C + 1 (g_0 first) pack to P = M * D tokens,
the valid ones first, the rest masked.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def beam_search(drafter, params, hidden: jax.Array, g0: jax.Array, embed_table: jax.Array, *,
                beam_width: int, draft_len: int):
  """Deterministic beam search of the draft head.

  hidden [B, H] and g0 [B] (the base LM's last hidden state and its token).
  Only beam 0 starts alive, so the first step spreads `beam_width` distinct
  tokens. Each step scores beam log-prob + log q over the vocabulary, keeps
  the top M of the M*V pairs and regathers beams and RNN states.
  Returns (beams int32 [B, M, C+1] with g0 first, scores [B, M] f32).
  """
  vocab = drafter.config.vocab_size
  if beam_width > vocab:
    raise ValueError(f"beam_width {beam_width} exceeds the vocabulary ({vocab})")
  batch = g0.shape[0]
  state = jnp.zeros((batch, beam_width, drafter.config.hidden_dim), hidden.dtype)
  scores = jnp.full((batch, beam_width), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  beams = jnp.broadcast_to(g0[:, None, None], (batch, beam_width, 1)).astype(jnp.int32)
  previous = beams[:, :, 0]
  h = jnp.broadcast_to(hidden[:, None], (batch, beam_width, hidden.shape[-1]))
  for _ in range(draft_len):
    state = drafter.apply({"params": params}, state, jnp.take(embed_table, previous, axis=0),
                          method=drafter.step)
    log_q = jax.nn.log_softmax(drafter.apply({"params": params}, h, state,
                                             method=drafter.logits), axis=-1)   # [B, M, V]
    candidates = (scores[:, :, None] + log_q).reshape(batch, beam_width * vocab)
    scores, index = jax.lax.top_k(candidates, beam_width)
    parent, previous = index // vocab, (index % vocab).astype(jnp.int32)
    state = jnp.take_along_axis(state, parent[:, :, None], axis=1)
    beams = jnp.concatenate([jnp.take_along_axis(beams, parent[:, :, None], axis=1),
                             previous[:, :, None]], axis=2)
  return beams, scores


class PackedTree(NamedTuple):
  """One row's beams deduplicated and packed (P = M * D slots, valid first)."""
  prefix_tree: jax.Array   # int32 [M, D]: smallest beam sharing beam i's first d+1 tokens
  unpacker: jax.Array      # int32 [M, D]: packed index of beam i's token at depth d
  tokens: jax.Array        # int32 [P]
  depth: jax.Array         # int32 [P]: 0 for g_0
  valid: jax.Array         # bool [P]: the first num_valid
  num_valid: jax.Array     # int32 scalar
  mask: jax.Array          # bool [P, P]: packed token p sees q (its ancestors and itself)


def pack_beams(beams: jax.Array) -> PackedTree:
  """Dedupes shared prefixes of beams [M, D] (spec steps 1-4).

  Keeps a token (i, d) only where no smaller beam shares beam i's first d+1
  tokens; the kept tokens, in (beam, depth) order, are topologically sorted.
  `packed.tokens[unpacker] == beams`.
  """
  num_beams, depth_len = beams.shape
  size = num_beams * depth_len
  same = beams[:, None, :] == beams[None, :, :]                      # [i, k, d]
  same_prefix = jnp.cumprod(same.astype(jnp.int32), axis=-1) > 0    # first d+1 equal
  prefix_tree = jnp.argmax(same_prefix, axis=1).astype(jnp.int32)   # smallest such k
  keep = (prefix_tree == jnp.arange(num_beams)[:, None]).reshape(size)
  order = jnp.argsort(~keep, stable=True)                            # kept first
  packed_index = jnp.zeros(size, jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
  packed_index = packed_index.reshape(num_beams, depth_len)
  unpacker = packed_index[prefix_tree, jnp.arange(depth_len)[None, :]]
  num_valid = jnp.sum(keep).astype(jnp.int32)
  valid = jnp.arange(size) < num_valid
  depth = jnp.tile(jnp.arange(depth_len, dtype=jnp.int32), num_beams)[order]
  beam_of = jnp.repeat(jnp.arange(num_beams), depth_len)[order]
  # ancestors[i, d, q]: packed token q is beam i's token at some depth <= d.
  hits = unpacker[:, :, None] == jnp.arange(size)[None, None, :]
  ancestors = jnp.cumsum(hits, axis=1) > 0
  mask = ancestors[beam_of, depth] & valid[:, None] & valid[None, :]
  return PackedTree(prefix_tree, unpacker, beams.reshape(size)[order].astype(jnp.int32),
                    depth, valid, num_valid, mask)


batched_pack_beams = jax.vmap(pack_beams)
