"""Speculative decoding with a ReDrafter draft head (ReDrafter, arXiv 2403.09919, section 3.3),
compiled end to end: prefill, then a `lax.while_loop` of
draft -> dedupe -> one base-LM forward over the packed tree -> accept.

Per step and row: the drafter's beam search proposes M beams of g_0 and C
draft tokens; the beams are deduplicated into one packed sequence
(`tree.pack_beams`) that the base LM scores in a single cached forward, each
packed token seeing the committed context and its own ancestors, at position
context length + depth. The accepted length of a beam is its number of
leading drafts equal to the base LM's argmax; the row commits g_0 and the
best beam's accepted drafts (accepted + 1 tokens), the base LM's own argmax
after them becomes the next g_0 and its hidden state the next h. The packed
forward wrote every packed token's K/V after the context: the chosen beam's
are moved into place, the rest lie beyond the committed length, unseen, and
are overwritten by the next step. Rows advance by different lengths (a cache
slot per row).

The output equals plain greedy decoding (`bt_jax.inference.generate` at
temperature 0) up to argmax ties; tests check it token for token.

With a sampling config that is not greedy, each step instead drafts M
sequences sampled independently from the drafter (`sampled_draft_fn`), packs
them the same way and accepts by recursive rejection sampling over the
candidates (`_accept_sampled`, exact for i.i.d. candidates): at each depth
the drafts that still follow the accepted path are tried in turn, each
against the residual the previous rejections left, so that every token is
distributed as plain sampling from the base model under that config. With
M = 1 this is the usual speculative sampling of one draft.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bt_jax import axes
from bt_jax.config import VanillaConfig
from bt_jax.inference.decoding import VanillaDecoder
from bt_jax.inference.generation import pad_rows, prepare_prompts
from bt_jax.inference.sampling import SamplingConfig, restrict_logits
from bt_jax import mesh as mesh_lib
from bt_jax.mesh import with_logical_rules
from bt_jax.models.vanilla import VanillaLM
from bt_jax.redrafter.checkpoint import check_drafter_fits
from bt_jax.redrafter.drafter import DraftHead, base_head_of, zero_state
from bt_jax.redrafter.tree import batched_pack_beams, beam_search, check_beam_width

# draft_fn(hidden [B, H], g0 [B], n_out [B], step) -> beams int32 [B, M, C+1], g0 first
# (greedy verification; for speculative sampling see `sampled_draft_fn`).
DraftFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
  """tokens [batch, max_new_tokens] (pad_id after a row's end); lengths
  [batch] (EOS included); steps: base-LM forwards after the prefill (scalar);
  row_steps [batch]: the steps each row was active; accepted [batch]: draft
  tokens accepted in all (tokens per step of a row = lengths / row_steps).
  Per step, [batch, max_new_tokens] (what the benchmark reads; None from
  loops that do not record them): step_accepted, the drafts accepted at each
  step (-1 once the row had finished or past the last step);
  step_tree_tokens, the packed tokens verified after the prefix dedupe (of
  M (C + 1); 0 there). crossings [batch] (a Block Transformer base with
  cross_blocks; None otherwise): the steps whose accepted path crossed the
  block boundary."""

  tokens: jax.Array
  lengths: jax.Array
  steps: jax.Array
  row_steps: jax.Array
  accepted: jax.Array
  step_accepted: Optional[jax.Array] = None
  step_tree_tokens: Optional[jax.Array] = None
  crossings: Optional[jax.Array] = None


jax.tree_util.register_dataclass(
  SpeculativeOutput,
  data_fields=[
    "tokens",
    "lengths",
    "steps",
    "row_steps",
    "accepted",
    "step_accepted",
    "step_tree_tokens",
    "crossings",
  ],
  meta_fields=[],
)


def drafter_draft_fn(
  drafter: DraftHead,
  drafter_params,
  embed_table: jax.Array,
  *,
  beam_width: int,
  base_head: Optional[jax.Array] = None,
  top_k: Optional[int] = None,
) -> DraftFn:
  """The draft function of a trained draft head: its beam search (base_head:
  the base LM's output kernel for a drafter that reads through it; top_k:
  the cut of the drafter's logits, see `tree.beam_search`)."""

  def draft(hidden, g0, n_out, step):
    del n_out, step
    beams, _ = beam_search(
      drafter,
      drafter_params,
      hidden,
      g0,
      embed_table,
      beam_width=beam_width,
      draft_len=drafter.config.draft_len,
      base_head=base_head,
      top_k=top_k,
    )
    return beams

  return draft


def sampled_draft_fn(
  drafter: DraftHead,
  drafter_params,
  embed_table: jax.Array,
  sampling: SamplingConfig,
  beam_width: int = 1,
  base_head: Optional[jax.Array] = None,
):
  """M = beam_width drafts sampled independently from the draft head, token
  by token, from its logits restricted like the target's (temperature,
  top-k, top-p): f(hidden, g0, n_out, step, key) -> (beams [B, M, C+1] with
  g0 first, q log-probs [B, M, C, V] of the distributions each draft token
  was drawn from). Each beam and depth draws with its own key; drafts that
  share a prefix share the drafter state, so q(.|prefix) is the same for
  them."""

  def draft(hidden, g0, n_out, step, key):
    del n_out, step
    apply = functools.partial(drafter.apply, {"params": drafter_params})
    batch = g0.shape[0]
    state = zero_state(drafter.config, (batch, beam_width), hidden.dtype)
    h = jnp.broadcast_to(hidden[:, None], (batch, beam_width, hidden.shape[-1]))
    previous = jnp.broadcast_to(g0[:, None], (batch, beam_width)).astype(jnp.int32)
    tokens, q_logprobs = [previous], []
    for t in range(drafter.config.draft_len):
      state = apply(state, jnp.take(embed_table, previous, axis=0), method=drafter.step)
      logits = apply(h, state, base_head, method=drafter.logits)
      log_q = jax.nn.log_softmax(restrict_logits(logits, sampling), axis=-1)  # [B, M, V]
      keys = jax.random.split(jax.random.fold_in(key, t), beam_width)
      previous = jax.vmap(
        lambda k, l: jax.random.categorical(k, l, axis=-1), in_axes=(0, 1), out_axes=1
      )(keys, log_q).astype(jnp.int32)
      tokens.append(previous)
      q_logprobs.append(log_q)
    return jnp.stack(tokens, axis=2), jnp.stack(q_logprobs, axis=2)

  return draft


def _residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """normalise(max(p - q, 0)), the target after a rejected candidate; p
  itself where that has no mass (p == q: then no rejection was for cause)."""
  residual = jnp.maximum(p - q, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  return jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)


def _accept_sampled_row(logits, unpacker, beams, q_logprobs, sampling, key, limit=None):
  """One row of `_accept_sampled`: logits [P, V], unpacker [M, D], beams
  [M, D], q_logprobs [M, C, V]; limit (a scalar, default C): the drafts
  past it are not tried, as if the beams were that long."""
  num_beams, depth_len = beams.shape
  draft_len = depth_len - 1
  p_packed = jax.nn.softmax(restrict_logits(logits, sampling), axis=-1)  # [P, V] f32
  q_probs = jnp.exp(q_logprobs.astype(jnp.float32))  # [M, C, V]
  uniforms = jax.random.uniform(jax.random.fold_in(key, 0), (draft_len, num_beams))
  if limit is None:
    limit = draft_len

  def depth_step(d, carry):
    alive, num_accepted, stopped, final_p = carry
    first = jnp.argmax(alive)  # alive beams share the node and q
    p = p_packed[unpacker[first, d]]
    q = q_probs[first, d]
    candidates = beams[:, d + 1]

    def try_beam(inner, m):
      p_now, taken, token = inner
      x = candidates[m]
      tried = alive[m] & ~taken
      accept = tried & (uniforms[d, m] * q[x] < p_now[x])  # u < p(x) / q(x)
      p_now = jnp.where(tried & ~accept, _residual(p_now, q), p_now)
      return (p_now, taken | accept, jnp.where(accept, x, token)), None

    (p_now, taken, token), _ = jax.lax.scan(
      try_beam, (p, jnp.bool_(False), jnp.int32(0)), jnp.arange(num_beams)
    )
    tried = ~stopped & (d < limit)
    advance = tried & taken
    reject_all = tried & ~taken
    cut = ~stopped & (d >= limit)  # the limit reached: the next token from p here
    return (
      jnp.where(advance, alive & (candidates == token), alive),
      num_accepted + advance.astype(jnp.int32),
      stopped | reject_all | cut,
      jnp.where(reject_all, p_now, jnp.where(cut, p, final_p)),
    )

  alive = jnp.ones((num_beams,), bool)
  alive, num_accepted, stopped, final_p = jax.lax.fori_loop(
    0, draft_len, depth_step, (alive, jnp.int32(0), jnp.bool_(False), jnp.zeros_like(p_packed[0]))
  )
  best = jnp.argmax(alive).astype(jnp.int32)  # holds the whole accepted path
  # All drafts accepted: the bonus token from p after the last.
  final_p = jnp.where(stopped, final_p, p_packed[unpacker[best, draft_len]])
  log_final = jnp.where(final_p > 0, jnp.log(jnp.where(final_p > 0, final_p, 1.0)), -jnp.inf)
  next_token = jax.random.categorical(jax.random.fold_in(key, 1), log_final)
  return best, num_accepted, next_token.astype(jnp.int32)


def _accept_sampled(logits, unpacker, beams, q_logprobs, sampling, key, limit=None):
  """Recursive rejection sampling over M i.i.d. sampled drafts (exact for
  the target distribution; with M = 1 plain speculative sampling).

  logits [B, P, V] of the packed tokens, unpacker [B, M, D], beams [B, M, D]
  (g0 first), q_logprobs [B, M, C, V]. At depth d the alive drafts are those
  whose tokens 1..d are the accepted path (at first all); p is the target's
  restricted, normalised distribution at that node, q the drafter's there.
  The alive drafts are tried in order: draft m's token x at depth d+1 is
  accepted with probability min(1, p(x)/q(x)); on rejection p becomes
  normalise(max(p - q, 0)) for the next. An acceptance appends x and keeps
  the alive drafts with x at depth d+1; when all are rejected the next token
  is drawn from the last residual; after C acceptances, from p after the
  last. limit [B] (optional, default C): at most limit[b] drafts of row b
  are tried, the next token then drawn from p after them (exact: as if the
  beams were cut there before the step). Returns (best [B]: a draft holding
  the accepted path, accepted [B], next token [B])."""
  keys = jax.random.split(key, logits.shape[0])
  if limit is None:
    return jax.vmap(lambda l, u, b, q, k: _accept_sampled_row(l, u, b, q, sampling, k))(
      logits, unpacker, beams, q_logprobs, keys
    )
  return jax.vmap(lambda l, u, b, q, k, n: _accept_sampled_row(l, u, b, q, sampling, k, n))(
    logits, unpacker, beams, q_logprobs, keys, limit
  )


def _tree_query(beams: jax.Array, length: jax.Array, pad: jax.Array, cache_len: int):
  """The packed, deduplicated tree of beams [B, M, D] and what the verify
  forward needs: (tree, mask [B, P, cache_len], positions [B, P]). Each
  packed token sees the committed context [pad, length) and, among the
  packed slots [length, length + P), its ancestors and itself."""
  batch, num_beams, depth_len = beams.shape
  packed_len = num_beams * depth_len
  tree = batched_pack_beams(beams)
  cache_slots = jnp.arange(cache_len)
  context = (cache_slots[None, :] >= pad[:, None]) & (cache_slots[None, :] < length[:, None])
  relative = cache_slots[None, :] - length[:, None]  # [B, S]
  in_tree = (relative >= 0) & (relative < packed_len)
  tree_visible = jnp.take_along_axis(
    tree.mask,
    jnp.broadcast_to(
      jnp.clip(relative, 0, packed_len - 1)[:, None, :], (batch, packed_len, cache_len)
    ),
    axis=2,
  )
  mask = context[:, None, :] | (tree_visible & in_tree[:, None, :])
  positions = (length - pad)[:, None] + tree.depth
  return tree, mask, positions


def _verify(decoder: VanillaDecoder, params, tree, mask, positions, cache, length, pad):
  """One base-model forward over the packed tokens, their K/V written at
  [length, length + P): (logits [B, P, V], cache, hidden [B, P, H]). The
  context every packed token sees is the run [pad, length): its window."""
  return decoder.apply_decode(
    params,
    tree.tokens,
    positions,
    cache,
    length,
    mask,
    False,
    True,
    window=(pad.astype(jnp.int32), length),
  )


def _accept_greedy(logits, unpacker, beams):
  """Greedy verification: (best [B]: the first beam with the most leading
  drafts equal to the base model's argmax, accepted [B] of that beam,
  predicted [B, P]: the argmax at each packed token)."""
  draft_len = beams.shape[2] - 1
  rows = jnp.arange(beams.shape[0])
  predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, P]
  beam_predicted = jax.vmap(lambda p, u: p[u])(predicted, unpacker)  # [B, M, D]
  matches = beam_predicted[:, :, :draft_len] == beams[:, :, 1:]
  accepted = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)  # [B, M]
  best = jnp.argmax(accepted, axis=-1)  # first of the longest
  return best, accepted[rows, best], predicted


def _append_output(state, committed, num_accepted, eos_id, max_new_tokens: int):
  """g0 and its accepted drafts (committed [B, D], g0 first) appended to
  state["out"] at each row's n_out, cut at the first EOS and at
  max_new_tokens; nothing for finished rows: (out, n_out, done). Shared by
  the vanilla and the Block Transformer loops."""
  done = state["done"]
  keep = jnp.arange(committed.shape[1])[None, :] <= num_accepted[:, None]
  is_eos = (committed == eos_id) & keep
  has_eos = jnp.any(is_eos, axis=-1)
  count = jnp.where(has_eos, jnp.argmax(is_eos, axis=-1) + 1, num_accepted + 1)
  count = jnp.minimum(count, max_new_tokens - state["n_out"])
  count = jnp.where(done, 0, count)
  # (Written whole: what lies past a row's n_out is cut at the end.)
  out = jax.vmap(lambda o, c, i: jax.lax.dynamic_update_slice_in_dim(o, c, i, axis=0))(
    state["out"], committed, state["n_out"]
  )
  n_out = state["n_out"] + count
  return out, n_out, done | has_eos | (n_out >= max_new_tokens)


def _commit(
  decoder: VanillaDecoder,
  state,
  beams,
  tree,
  cache,
  hidden,
  best,
  num_accepted,
  new_g0,
  max_new_tokens: int,
  eos_id,
):
  """The state after a step: the chosen beam's accepted K/V moved into place,
  g0 and its accepted drafts appended to the output (cut at the first EOS
  and at max_new_tokens), the next g0 (`new_g0` [B], or None: the base
  model's argmax after the last accepted draft, `new_g0` then being
  predicted [B, P]) and h; and the per-step record (accepted drafts, -1
  where the row had finished; packed tokens after the dedupe, 0 there)."""
  length, done = state["length"], state["done"]
  rows = jnp.arange(beams.shape[0])
  best_slots = tree.unpacker[rows, best]  # [B, D] packed index
  # Move the chosen beam's K/V from its packed slots to length .. length + C.
  cache = decoder.move_slots(cache, length[:, None] + best_slots, length)
  committed = beams[rows, best]  # [B, D], g0 first
  next_at = best_slots[rows, num_accepted]  # packed index
  if new_g0.ndim == 2:  # the argmax at each packed token: the one after the accepted drafts
    new_g0 = new_g0[rows, next_at]
  new_hidden = hidden[rows, next_at]
  out, n_out, new_done = _append_output(state, committed, num_accepted, eos_id, max_new_tokens)
  active = ~done
  step = state["step"]
  return {
    "cache": cache,
    "length": jnp.where(active, length + num_accepted + 1, length),
    "g0": jnp.where(active, new_g0, state["g0"]),
    "hidden": jnp.where(active[:, None], new_hidden, state["hidden"]),
    "out": out,
    "n_out": n_out,
    "done": new_done,
    "step": step + 1,
    "row_steps": state["row_steps"] + active.astype(jnp.int32),
    "accepted": state["accepted"] + jnp.where(active, num_accepted, 0),
    "step_accepted": state["step_accepted"].at[:, step].set(jnp.where(active, num_accepted, -1)),
    "step_tree_tokens": state["step_tree_tokens"]
    .at[:, step]
    .set(jnp.where(active, tree.num_valid, 0)),
  }


def _initial_state(prefill, first, prompt_len: int, out_len: int, max_new_tokens: int, pad_id: int):
  """The loop state after the prefill (`VanillaDecoder.prefill` with
  return_hidden) and its first token `first` [B]."""
  batch = first.shape[0]
  return {
    "cache": prefill["cache"],
    "length": jnp.full((batch,), prompt_len, jnp.int32),  # committed cache slots
    "g0": first.astype(jnp.int32),
    "hidden": prefill["hidden"],
    "out": jnp.full((batch, out_len), pad_id, jnp.int32),
    "n_out": jnp.zeros((batch,), jnp.int32),
    "done": jnp.zeros((batch,), bool),
    "step": jnp.int32(0),
    "row_steps": jnp.zeros((batch,), jnp.int32),
    "accepted": jnp.zeros((batch,), jnp.int32),
    # Per step (at most max_new_tokens steps): accepted drafts, packed tree tokens.
    "step_accepted": jnp.full((batch, max_new_tokens), -1, jnp.int32),
    "step_tree_tokens": jnp.zeros((batch, max_new_tokens), jnp.int32),
  }


def _speculate(
  model: VanillaLM,
  draft_fn: DraftFn,
  num_beams: int,
  draft_len: int,
  max_new_tokens: int,
  params,
  tokens,
  pad,
  eos_id,
  sampling: Optional[SamplingConfig] = None,
  rng: Optional[jax.Array] = None,
  mesh: Optional[Mesh] = None,
):
  """The loop; sampling None (or greedy) verifies greedily, otherwise by
  recursive rejection sampling over sampled drafts (see `sampled_draft_fn`,
  `_accept_sampled`): draft_fn then also takes a key and returns (beams
  [B, M, C+1], q log-probs [B, M, C, V]). Each step is draft ->
  `_tree_query` -> `_verify` -> accept -> `_commit` (`greedy_step_parts`
  jits them one by one, for timing)."""
  cfg: VanillaConfig = model.config
  sampled = sampling is not None and not sampling.greedy
  if sampled and rng is None:
    raise ValueError("speculative sampling needs an rng key")
  depth_len = draft_len + 1
  packed_len = num_beams * depth_len
  # A mesh with a `sequence` axis: the KV cache is split over it (round-robin
  # slots, Tree Attention; see bt_jax.distributed.sharded_cache): the decoder
  # passes its ShardedKVCache to the model calls.
  decoder = VanillaDecoder(model, mesh if _sequence_axis_size(mesh) else None)
  after_prompt = max_new_tokens + depth_len + packed_len
  tokens, pad = decoder.align_prompt(tokens, pad, after_prompt)  # slots split evenly
  batch, prompt_len = tokens.shape
  cache_len = prompt_len + after_prompt
  out_len = max_new_tokens + depth_len

  # Prefill (the plain decoder's): the prompt's K/V, g_0 and h from its last position.
  prefill = decoder.prefill(params, tokens, pad, after_prompt, return_hidden=True)
  if sampled:
    prefill_key, rng = jax.random.split(rng)
    first = jax.random.categorical(
      prefill_key, restrict_logits(prefill["logits"], sampling), axis=-1
    )
  else:
    first = jnp.argmax(prefill["logits"], axis=-1)
  state = _initial_state(prefill, first, prompt_len, out_len, max_new_tokens, cfg.pad_id)

  def step(state):
    if sampled:
      key = jax.random.fold_in(rng, state["step"])
      beams, q_logprobs = draft_fn(
        state["hidden"], state["g0"], state["n_out"], state["step"], jax.random.fold_in(key, 0)
      )
    else:
      beams = draft_fn(state["hidden"], state["g0"], state["n_out"], state["step"])
    beams = beams.astype(jnp.int32)
    if beams.shape[1:] != (num_beams, depth_len):
      raise ValueError(
        f"draft_fn returned beams of shape {beams.shape}; expected "
        f"[batch, {num_beams}, {depth_len}] (num_beams, draft_len + 1)"
      )
    tree, mask, positions = _tree_query(beams, state["length"], pad, cache_len)
    logits, cache, hidden = _verify(
      decoder, params, tree, mask, positions, state["cache"], state["length"], pad
    )
    if sampled:
      best, num_accepted, new_g0 = _accept_sampled(
        logits, tree.unpacker, beams, q_logprobs, sampling, jax.random.fold_in(key, 1)
      )
    else:
      best, num_accepted, new_g0 = _accept_greedy(logits, tree.unpacker, beams)
    return _commit(
      decoder, state, beams, tree, cache, hidden, best, num_accepted, new_g0, max_new_tokens, eos_id
    )

  def cond(state):
    return ~jnp.all(state["done"]) & (state["step"] < max_new_tokens)

  state = jax.lax.while_loop(cond, step, state)
  return _output(state, max_new_tokens, cfg.pad_id)


def _output(state, max_new_tokens: int, pad_id: int) -> "SpeculativeOutput":
  positions = jnp.arange(max_new_tokens)[None, :]
  tokens_out = jnp.where(
    positions < state["n_out"][:, None], state["out"][:, :max_new_tokens], pad_id
  )
  return SpeculativeOutput(
    tokens=tokens_out,
    lengths=state["n_out"],
    steps=state["step"],
    row_steps=state["row_steps"],
    accepted=state["accepted"],
    step_accepted=state["step_accepted"],
    step_tree_tokens=state["step_tree_tokens"],
  )


@dataclasses.dataclass(frozen=True)
class GreedyStepParts:
  """The greedy loop of `drafter_generate_fn` cut into separately jitted
  parts (`greedy_step_parts`), each the very function the loop traces, for
  timing one speculative step part by part (experiments.redrafter_bench):

    prefill(params, tokens, pad) -> state          the prompt, g0 and h
    draft(drafter_params, params, state) -> beams  the drafter's beam search
    tree(state, beams, pad) -> (tree, mask, positions)     pack + dedupe, masks
    verify(params, state, tree, mask, positions, pad) -> (logits, cache, hidden)
    commit(state, beams, tree, logits, cache, hidden) -> state   accept, move K/V, output
    output(state) -> SpeculativeOutput

  Chained for `output(state).steps` steps they give the loop's tokens. One
  device (no mesh); eos_id is fixed when the parts are made."""

  prefill: Callable
  draft: Callable
  tree: Callable
  verify: Callable
  commit: Callable
  output: Callable


def greedy_step_parts(
  model: VanillaLM,
  drafter: DraftHead,
  beam_width: int,
  max_new_tokens: int,
  prompt_len: int,
  eos_id: int = -1,
  draft_top_k: Optional[int] = None,
) -> GreedyStepParts:
  """`GreedyStepParts` of the greedy loop for prompts of `prompt_len` tokens."""
  _check(model, beam_width=beam_width, max_new_tokens=max_new_tokens, prompt_len=prompt_len)
  check_beam_width(beam_width, drafter.config.vocab_size)
  cfg: VanillaConfig = model.config
  draft_len = drafter.config.draft_len
  depth_len = draft_len + 1
  after_prompt = max_new_tokens + depth_len + beam_width * depth_len
  cache_len = prompt_len + after_prompt
  decoder = VanillaDecoder(model)

  def prefill(params, tokens, pad):
    carry = decoder.prefill(params, tokens, pad, after_prompt, return_hidden=True)
    first = jnp.argmax(carry["logits"], axis=-1)
    return _initial_state(
      carry, first, prompt_len, max_new_tokens + depth_len, max_new_tokens, cfg.pad_id
    )

  def draft(drafter_params, params, state):
    draft_fn = drafter_draft_fn(
      drafter,
      drafter_params,
      params["token_embed"]["embedding"],
      beam_width=beam_width,
      base_head=base_head_of(drafter, params),
      top_k=draft_top_k,
    )
    return draft_fn(state["hidden"], state["g0"], state["n_out"], state["step"]).astype(jnp.int32)

  def tree(state, beams, pad):
    return _tree_query(beams, state["length"], pad, cache_len)

  def verify(params, state, tree, mask, positions, pad):
    return _verify(decoder, params, tree, mask, positions, state["cache"], state["length"], pad)

  def commit(state, beams, tree, logits, cache, hidden):
    best, num_accepted, predicted = _accept_greedy(logits, tree.unpacker, beams)
    return _commit(
      decoder,
      state,
      beams,
      tree,
      cache,
      hidden,
      best,
      num_accepted,
      predicted,
      max_new_tokens,
      jnp.int32(eos_id),
    )

  def output(state):
    return _output(state, max_new_tokens, cfg.pad_id)

  return GreedyStepParts(
    prefill=jax.jit(prefill),
    draft=jax.jit(draft),
    tree=jax.jit(tree),
    verify=jax.jit(verify),
    commit=jax.jit(commit),
    output=jax.jit(output),
  )


def _check(model, **sizes) -> None:
  if not isinstance(model, VanillaLM):
    hint = (
      " (a BlockTransformer takes bt_jax.redrafter.block_speculative.block_speculative_generate)"
      if type(model).__name__ == "BlockTransformer"
      else ""
    )
    raise TypeError(
      f"speculative decoding needs a VanillaLM base model; got {type(model).__name__}{hint}"
    )
  for name, value in sizes.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer; got {value!r}")


def speculative_generate_fn(
  model: nn.Module, draft_fn: DraftFn, *, num_beams: int, draft_len: int, max_new_tokens: int
):
  """The jitted loop: f(params, tokens [B, prompt_len], pad [B], eos_id) ->
  SpeculativeOutput. draft_fn must return [B, num_beams, draft_len + 1]."""
  _check(model, num_beams=num_beams, draft_len=draft_len, max_new_tokens=max_new_tokens)
  return jax.jit(
    functools.partial(_speculate, model, draft_fn, num_beams, draft_len, max_new_tokens)
  )


def speculative_generate(
  model: VanillaLM,
  params,
  drafter: DraftHead,
  drafter_params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  beam_width: Optional[int] = None,
  eos_id: Optional[int] = None,
  sampling: SamplingConfig = SamplingConfig(),
  seed: int = 0,
  mesh: Optional[Mesh] = None,
  draft_top_k: Optional[int] = None,
) -> SpeculativeOutput:
  """Generation of up to max_new_tokens after each prompt, drafted by
  `drafter` and verified by the base model in one forward per step.

  Greedy `sampling` (the default): beam search of `beam_width` (default 4)
  beams of drafter.config.draft_len tokens, greedy verification: the same
  tokens as greedy `bt_jax.inference.generate`. Otherwise `beam_width`
  (default 1) drafts sampled independently from the drafter and recursive
  rejection sampling over them: every token is distributed as the base
  model's, restricted by `sampling` (temperature, top-k, top-p); more drafts
  accept more tokens per step (in expectation), never change the
  distribution. `seed` picks the draws.

  mesh: either a mesh with a `data` axis, a `sequence` axis or both (other
  axes of size 1), parameters replicated: the rows, with their caches and
  loop state, are split over `data`, and each row's KV cache over `sequence`
  (round-robin slots, attended by Tree Attention; the accepted draft's K/V
  move between devices as entries, not caches); or a (data, fsdp, tensor)
  mesh (`bt_jax.mesh.make_mesh`): the base model's parameters placed by the
  training rules (a model too big for one device), the rows split over
  data x fsdp, activations by the models' logical constraints. The batch is
  padded with copies of the first prompt up to a multiple of the row split,
  and those rows dropped from the output. The same tokens as on one device.

  draft_top_k: cut the drafter's logits to their top k before beam search
  (greedy only; `tree.beam_search`). A drafter made for another base model
  (width, vocabulary), a beam width or draft length out of range are errors
  naming both sides.
  """
  if beam_width is None:
    beam_width = 4 if sampling.greedy else 1
  _check(model, beam_width=beam_width, max_new_tokens=max_new_tokens)
  check_drafter_fits(drafter, model.config)
  if sampling.greedy:  # beam search keeps distinct beams (sampled drafts may repeat)
    check_beam_width(beam_width, drafter.config.vocab_size)
  elif draft_top_k is not None:
    raise ValueError(
      "draft_top_k cuts the drafter's logits before beam search (greedy); "
      "sampled drafts use the sampling config's top_k"
    )
  if drafter.config.draft_len >= model.config.max_len:
    raise ValueError(
      f"the drafter's draft_len {drafter.config.draft_len} must be below the "
      f"base model's max_len {model.config.max_len}"
    )
  num_prompts = len(prompts)
  prompts = pad_rows(prompts, _row_groups(mesh))
  batch = prepare_prompts(prompts, model.config, max_new_tokens)
  fn = drafter_generate_fn(model, drafter, beam_width, max_new_tokens, sampling, mesh, draft_top_k)
  args = (
    params,
    drafter_params,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.pad),
    jnp.int32(-1 if eos_id is None else eos_id),
    jax.random.key(seed),
  )
  if mesh is not None:  # arrays committed to one device cannot enter a mesh computation
    mesh_lib.check_params_fit(model, mesh, params)
    args = jax.device_put(args, _in_shardings(model, mesh))
  out = fn(*args)
  if len(prompts) == num_prompts:
    return out
  return dataclasses.replace(
    out,
    **{
      name: getattr(out, name)[:num_prompts]
      for name in (
        "tokens",
        "lengths",
        "row_steps",
        "accepted",
        "step_accepted",
        "step_tree_tokens",
      )
    },
  )


_is_model_mesh = mesh_lib.is_model_mesh


def _check_mesh(mesh: Optional[Mesh]) -> None:
  """Two kinds of mesh: (data, fsdp, tensor), or one with `data` and/or
  `sequence` (other axes of size 1); anything else is an error naming it."""
  if mesh is None:
    return
  shape = dict(mesh.shape)
  if _is_model_mesh(mesh):
    if len(shape) != len(axes.MESH_AXES):
      raise ValueError(
        f"a (data, fsdp, tensor) mesh for speculative decoding has no other axes; got {shape}"
      )
    return
  if "data" not in shape and "sequence" not in shape:
    raise ValueError(
      f"speculative decoding splits rows over a `data` mesh axis and the KV "
      f"cache over a `sequence` axis, or the model over a (data, fsdp, tensor) "
      f"mesh; the mesh has axes {shape}"
    )
  others = {k: v for k, v in shape.items() if k not in ("data", "sequence") and v > 1}
  if others:
    raise ValueError(
      f"speculative decoding on a (data, sequence) mesh shards only the rows "
      f"and the KV cache; the mesh also splits {others}: give those axes size "
      "1, or use a (data, fsdp, tensor) mesh (bt_jax.mesh.make_mesh)"
    )


def _rows_spec(mesh: Mesh) -> P:
  """How per-row arrays are split (`bt_jax.mesh.rows_spec`)."""
  return mesh_lib.rows_spec(mesh)


def _row_groups(mesh: Optional[Mesh]) -> int:
  """Rows are split this many ways (the batch is padded to a multiple)."""
  _check_mesh(mesh)
  return mesh_lib.row_groups(mesh)


def _sequence_axis_size(mesh: Optional[Mesh]) -> int:
  """The KV cache is split this many ways (0: no sequence axis)."""
  return 0 if mesh is None else dict(mesh.shape).get("sequence", 0)


def _in_shardings(model: VanillaLM, mesh: Mesh):
  """(params, drafter params, tokens, pad, eos_id, rng): the base model's
  params by the training rules on a model mesh (else replicated), the rows
  split, the rest replicated."""
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, _rows_spec(mesh))
  params = mesh_lib.param_shardings(model, mesh) if _is_model_mesh(mesh) else replicated
  return (params, replicated, rows, rows, replicated, replicated)


def make_draft_fn(
  drafter: DraftHead,
  drafter_params,
  params,
  sampling: SamplingConfig,
  beam_width: int,
  draft_top_k: Optional[int] = None,
):
  """The draft step of one speculative step for the base model's `params`
  (its token embedding, and its output layer when the head reads it): beam
  search for greedy decoding, `beam_width` sampled drafts otherwise. The
  vanilla and the Block Transformer loops both draft through it."""
  table, base_head = params["token_embed"]["embedding"], base_head_of(drafter, params)
  if sampling.greedy:
    return drafter_draft_fn(
      drafter, drafter_params, table, beam_width=beam_width, base_head=base_head, top_k=draft_top_k
    )
  return sampled_draft_fn(
    drafter, drafter_params, table, sampling, beam_width=beam_width, base_head=base_head
  )


@functools.lru_cache(maxsize=16)
def drafter_generate_fn(
  model: VanillaLM,
  drafter: DraftHead,
  beam_width: int,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  mesh: Optional[Mesh] = None,
  draft_top_k: Optional[int] = None,
):
  """The jitted loop with the draft head: f(params, drafter_params, tokens,
  pad, eos_id, rng) -> SpeculativeOutput (beam search and greedy
  verification, or beam_width sampled drafts and recursive rejection
  sampling; see `speculative_generate`). Cached: one compile per (model,
  drafter, beams, max_new, sampling, mesh); the drafter's params are an
  argument, not a closure constant. With `mesh` (see `speculative_generate`)
  the arguments must be placed by `_in_shardings(model, mesh)`."""
  _check_mesh(mesh)

  def run(params, drafter_params, tokens, pad, eos_id, rng):
    draft_fn = make_draft_fn(drafter, drafter_params, params, sampling, beam_width, draft_top_k)
    return _speculate(
      model,
      draft_fn,
      beam_width,
      drafter.config.draft_len,
      max_new_tokens,
      params,
      tokens,
      pad,
      eos_id,
      sampling,
      rng,
      mesh,
    )

  if mesh is None:
    return jax.jit(run)
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, _rows_spec(mesh))
  out = SpeculativeOutput(
    tokens=rows,
    lengths=rows,
    steps=replicated,
    row_steps=rows,
    accepted=rows,
    step_accepted=rows,
    step_tree_tokens=rows,
  )
  if _is_model_mesh(mesh):  # the models' logical constraints shard the activations
    run = with_logical_rules(run, mesh, axes.DEFAULT_RULES)
  return jax.jit(run, in_shardings=_in_shardings(model, mesh), out_shardings=out)
