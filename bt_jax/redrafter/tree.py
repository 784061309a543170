"""Beam search over drafts and dynamic tree attention (ReDrafter, arXiv
2403.09919, sections 3.2 and 3.3).

All functions work on one row unless named `batched_*`, and have static
shapes: beams [M, D] with D = C + 1 (g_0 first) pack to P = M * D tokens,
the valid ones first, the rest masked.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bt_jax.redrafter.drafter import zero_state


def beam_search(
  drafter,
  params,
  hidden: jax.Array,
  g0: jax.Array,
  embed_table: jax.Array,
  *,
  beam_width: int,
  draft_len: int,
  base_head: Optional[jax.Array] = None,
  top_k: Optional[int] = None,
):
  """Deterministic beam search of the draft head.

  hidden [B, H] and g0 [B] (the base LM's last hidden state and its token);
  base_head: the base LM's output kernel, for a drafter that reads through
  it (`drafter.base_head_of`). Only beam 0 starts alive, so the first step
  spreads `beam_width` distinct tokens. Each step scores beam log-prob +
  log q over the vocabulary, keeps the top M of the M*V pairs and regathers
  beams and RNN states. With `top_k`, each beam's drafter logits outside
  its top k are cut (to -inf) before the log-softmax, as the released code
  and TensorRT-LLM do (top 50 there): q is renormalised over those k, and a
  beam has at most k children (with k < M, beams beyond the distinct ones
  repeat with score -inf).
  Returns (beams int32 [B, M, C+1] with g0 first, scores [B, M] f32).
  """
  vocab = drafter.config.vocab_size
  check_beam_width(beam_width, vocab)
  if top_k is not None and not 1 <= top_k <= vocab:
    raise ValueError(f"top_k {top_k} must be in [1, vocabulary size {vocab}]")
  batch = g0.shape[0]
  state = zero_state(drafter.config, (batch, beam_width), hidden.dtype)
  scores = jnp.full((batch, beam_width), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  beams = jnp.broadcast_to(g0[:, None, None], (batch, beam_width, 1)).astype(jnp.int32)
  previous = beams[:, :, 0]
  h = jnp.broadcast_to(hidden[:, None], (batch, beam_width, hidden.shape[-1]))
  for _ in range(draft_len):
    state = drafter.apply(
      {"params": params}, state, jnp.take(embed_table, previous, axis=0), method=drafter.step
    )
    logits = drafter.apply(
      {"params": params}, h, state, base_head, method=drafter.logits
    )  # [B, M, V]
    if top_k is not None and top_k < vocab:
      kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
      logits = jnp.where(logits >= kth, logits, -jnp.inf)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    candidates = (scores[:, :, None] + log_q).reshape(batch, beam_width * vocab)
    scores, index = jax.lax.top_k(candidates, beam_width)
    parent, previous = index // vocab, (index % vocab).astype(jnp.int32)
    state = jnp.take_along_axis(state, parent[:, :, None], axis=1)
    beams = jnp.concatenate(
      [jnp.take_along_axis(beams, parent[:, :, None], axis=1), previous[:, :, None]], axis=2
    )
  return beams, scores


def check_beam_width(beam_width, vocab_size: int) -> None:
  """Beam search keeps distinct beams: 1 <= beam_width <= the vocabulary."""
  if not isinstance(beam_width, int) or beam_width < 1:
    raise ValueError(f"beam_width must be a positive integer; got {beam_width!r}")
  if beam_width > vocab_size:
    raise ValueError(
      f"beam_width {beam_width} exceeds the vocabulary ({vocab_size}): beam "
      "search keeps distinct beams"
    )


class PackedTree(NamedTuple):
  """One row's beams deduplicated and packed (P = M * D slots, valid first)."""

  prefix_tree: jax.Array  # int32 [M, D]: smallest beam sharing beam i's first d+1 tokens
  unpacker: jax.Array  # int32 [M, D]: packed index of beam i's token at depth d
  tokens: jax.Array  # int32 [P]
  depth: jax.Array  # int32 [P]: 0 for g_0
  valid: jax.Array  # bool [P]: the first num_valid
  num_valid: jax.Array  # int32 scalar
  mask: jax.Array  # bool [P, P]: packed token p sees q (its ancestors and itself)


def pack_beams(beams: jax.Array) -> PackedTree:
  """Dedupes shared prefixes of beams [M, D] (spec steps 1-4).

  Keeps a token (i, d) only where no smaller beam shares beam i's first d+1
  tokens; the kept tokens, in (beam, depth) order, are topologically sorted.
  `packed.tokens[unpacker] == beams`.
  """
  num_beams, depth_len = beams.shape
  size = num_beams * depth_len
  same = beams[:, None, :] == beams[None, :, :]  # [i, k, d]
  same_prefix = jnp.cumprod(same.astype(jnp.int32), axis=-1) > 0  # first d+1 equal
  prefix_tree = jnp.argmax(same_prefix, axis=1).astype(jnp.int32)  # smallest such k
  keep = (prefix_tree == jnp.arange(num_beams)[:, None]).reshape(size)
  order = jnp.argsort(~keep, stable=True)  # kept first
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
  return PackedTree(
    prefix_tree,
    unpacker,
    beams.reshape(size)[order].astype(jnp.int32),
    depth,
    valid,
    num_valid,
    mask,
  )


batched_pack_beams = jax.vmap(pack_beams)
