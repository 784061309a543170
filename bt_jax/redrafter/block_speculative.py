"""Speculative decoding of a Block Transformer with a ReDrafter draft head,
drafts within the current block and across its boundary (ReDrafter, arXiv
2403.09919, on the Block Transformer of arXiv 2406.02657; docs/redrafter.md,
"A Block Transformer base model").

The Block Transformer makes a block of L_B tokens with its token decoder,
one token at a time over a small local cache that starts from the block's
context embedding; the block decoder then embeds the finished block and
runs one step over its global cache of blocks. Here the token decoder's
steps are speculated:

- the draft head reads the token decoder's final-norm hidden state (its
  width is the token decoder's, E the token decoder's embedding table and
  the base head the Block Transformer's output layer);
- per step and row, beam search drafts M beams of g_0 and C tokens; they
  are deduplicated into one packed tree (`tree.pack_beams`) that the token
  decoder verifies in one cached forward over its local cache, each packed
  token seeing the block's committed local slots and its own ancestors, at
  local position committed + depth;
- with cross_blocks=False (step one) a draft never leaves the current
  block: of a beam's C drafts only the first L_B - 1 - j count, j being
  g_0's index in its block;
- a row whose committed tokens complete its block runs the block decoder
  on it (one step at its own global-cache slot: rows finish blocks at
  different steps), expands the new context embedding and runs the token
  decoder's first pass on a fresh local cache, which gives the next g_0 and
  h. The block decoder runs once per completed block and row, as in plain
  decoding.

Greedy verification gives the tokens of plain greedy Block Transformer
decoding (`bt_jax.inference.generate`); sampled drafts with recursive
rejection sampling (`speculative._accept_sampled`) keep every token
distributed as plain sampling. Both are tested token for token and against
the exact joint distribution (tests/redrafter/test_block_speculative.py).

With cross_blocks=True (the default; `step_cross` in the loop) beams may
run past the block's end. Where C > L_B - 1 - j, each beam's in-block part
completes the block: its candidate block. The M candidate blocks go through
one block-decoder step together (at the row's next global position, K/V at
M scratch slots after the committed ones, each seeing the committed cache
and itself only: tree attention of depth one at the block level); per
candidate the token decoder runs its first pass and the beam's drafts past
the boundary (at most L_B - 1 of them count) on a fresh local cache.
Acceptance runs over the whole path, each depth's target from the forward
whose context plain decoding would use; if the accepted path completes the
block, the chosen candidate's block K/V, expansion and local cache become
the row's. Greedy stays token for token equal to `generate`, sampling
exact (tested the same ways). `SpeculativeOutput.crossings` counts the
crossing steps per row.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from bt_jax.config import BlockConfig
from bt_jax.inference import caches as caches_lib
from bt_jax.inference.decoding import BlockDecoder
from bt_jax.inference.generation import prepare_prompts
from bt_jax.inference.sampling import SamplingConfig, restrict_logits
from bt_jax.models.block import BlockTransformer
from bt_jax.redrafter.drafter import DraftHead, base_head_of, teacher_forcing_loss
from bt_jax.redrafter.speculative import (
  DraftFn,
  SpeculativeOutput,
  _accept_sampled,
  _append_output,
  make_draft_fn,
)
from bt_jax.redrafter.tree import batched_pack_beams, check_beam_width

__all__ = [
  "block_drafter_generate_fn",
  "block_drafter_loss",
  "block_hidden_states",
  "block_speculative_generate",
  "block_speculative_generate_fn",
  "check_block_drafter_fits",
  "train_block_drafter",
]


# ---- Model calls that also return the token decoder's hidden state. ----


def _token_forward(
  module: BlockTransformer, inputs, positions, caches, cache_index, mask, memory, window
):
  """`BlockTransformer.token_step` that also returns the final-norm hidden
  state [batch, q, token_width] the draft head reads."""
  hidden, caches = module.token_decoder(
    inputs,
    positions,
    memory=memory,
    mask=mask,
    caches=caches,
    cache_index=cache_index,
    window=window,
  )
  return module.lm_head(hidden).astype(jnp.float32), caches, hidden


def _target_hidden(module: BlockTransformer, tokens: jax.Array) -> jax.Array:
  """The training forward's token-decoder hidden states: [batch, (N-1) L,
  token_width], entry k predicting token L + k (`decode_blocks`, without
  the head)."""
  cfg = module.config
  blocks = module.split_blocks(tokens)
  context = module.context_embeddings(blocks)[:, :-1]
  targets = blocks[:, 1:]
  batch, m, block_len = targets.shape
  width = cfg.token_width
  expanded = module.expansion(context).reshape(batch, m, cfg.num_expanded, width)
  memory = None
  if cfg.token_decoder == "prefix":
    inputs = jnp.concatenate([expanded, module.token_embed(targets[..., :-1])], axis=2)
  else:
    bos = jnp.full((batch, m, 1), cfg.bos_id, targets.dtype)
    inputs = module.token_embed(jnp.concatenate([bos, targets[..., :-1]], axis=2))
    if cfg.token_decoder == "summation":
      inputs = inputs + expanded
    else:
      memory = expanded.reshape(batch * m, block_len, width)
  seq = inputs.shape[2]
  hidden = module.token_decoder(
    inputs.reshape(batch * m, seq, width), jnp.arange(seq), memory=memory
  )[:, seq - block_len :]
  return hidden.reshape(batch, m * block_len, width)


def block_hidden_states(model: BlockTransformer, params, tokens: jax.Array) -> jax.Array:
  """What the draft head reads at each position: [batch, T, token_width],
  entry t the token decoder's final-norm hidden state whose output predicts
  token t + 1 (as `VanillaLM.hidden_states` is for a vanilla model). tokens
  [batch, T], T a multiple of L_B; entries t < L_B - 1 (block 0 is never
  predicted) and t = T - 1 are zeros."""
  predicting = model.apply({"params": params}, tokens, method=_target_hidden)
  block_len = model.config.block_len
  return jnp.pad(predicting, ((0, 0), (block_len - 1, 1), (0, 0)))


def block_drafter_loss(
  model: BlockTransformer,
  drafter: DraftHead,
  drafter_params,
  params,
  tokens: jax.Array,
  mask: jax.Array,
  target_mask: Optional[jax.Array] = None,
):
  """`teacher_forcing_loss` (hard labels) on a Block Transformer base: the
  token decoder's hidden states (`block_hidden_states`), its embedding
  table and output layer. Positions before the first predicted token (block
  0) are no drafting positions."""
  hidden = block_hidden_states(model, params, tokens)
  block_len = model.config.block_len
  has_hidden = jnp.arange(tokens.shape[1])[None, :] >= block_len - 1
  return teacher_forcing_loss(
    drafter,
    drafter_params,
    hidden,
    params["token_embed"]["embedding"],
    tokens,
    mask & has_hidden,
    base_head=base_head_of(drafter, params),
    target_mask=target_mask,
  )


def train_block_drafter(
  model: BlockTransformer,
  params,
  drafter: DraftHead,
  drafter_params,
  tokens,
  *,
  steps: int,
  learning_rate: float = 1e-2,
  target_mask=None,
  batch_size: int = 16,
  seed: int = 0,
):
  """A few Adam steps of `block_drafter_loss` on rows of `tokens` [rows, T]
  (e.g. prompts and the base model's greedy continuations, target_mask 1 on
  the continuations): (drafter params, [loss per step])."""
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  target_mask = mask if target_mask is None else jnp.asarray(target_mask, bool)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(drafter_params, opt_state, rows):
    def loss(p):
      return block_drafter_loss(
        model, drafter, p, params, tokens[rows], mask[rows], target_mask[rows]
      )[0]

    value, grads = jax.value_and_grad(loss)(drafter_params)
    updates, opt_state = optimizer.update(grads, opt_state, drafter_params)
    return optax.apply_updates(drafter_params, updates), opt_state, value

  opt_state = optimizer.init(drafter_params)
  key, losses = jax.random.key(seed), []
  for i in range(steps):
    rows = jax.random.choice(
      jax.random.fold_in(key, i),
      tokens.shape[0],
      (min(batch_size, tokens.shape[0]),),
      replace=False,
    )
    drafter_params, opt_state, value = step(drafter_params, opt_state, rows)
    losses.append(float(value))
  return drafter_params, losses


# ---- Checks. ----


def check_block_drafter_fits(
  drafter: DraftHead, model_config, recorded_base: Optional[Mapping[str, Any]] = None
) -> None:
  """A drafter made for another base model is an error naming both sides:
  the recorded kind (drafter.json's "base_model"), the vocabulary and the
  width against the Block Transformer's token decoder."""
  kind = getattr(model_config, "kind", type(model_config).__name__)
  if recorded_base and recorded_base.get("kind") not in (None, "block"):
    raise ValueError(
      f"the drafter was trained for a {recorded_base['kind']} base model; this base model is {kind}"
    )
  if not isinstance(model_config, BlockConfig):
    raise ValueError(
      f"block speculative decoding drafts for a block base model; this base "
      f"model is {kind} (use speculative_generate)"
    )
  cfg = drafter.config
  width = model_config.token_width
  if (cfg.vocab_size, cfg.hidden_dim, cfg.embed_dim) != (model_config.vocab_size, width, width):
    raise ValueError(
      f"the drafter was made for vocab {cfg.vocab_size} and width {cfg.hidden_dim}; this "
      f"block base model has vocab {model_config.vocab_size} and token decoder width {width}"
      + (
        f" (the drafter's embedding width is {cfg.embed_dim})"
        if cfg.embed_dim != cfg.hidden_dim
        else ""
      )
    )
  if recorded_base and recorded_base.get("width") not in (None, width):
    raise ValueError(
      f"the drafter was trained for a base model of width "
      f"{recorded_base['width']}; this block base model's token decoder has "
      f"width {width}"
    )


def _check(model, **sizes) -> None:
  if not isinstance(model, BlockTransformer):
    raise TypeError(
      f"block speculative decoding needs a BlockTransformer base model; got "
      f"{type(model).__name__} (a VanillaLM takes speculative_generate)"
    )
  for name, value in sizes.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer; got {value!r}")


# ---- The loop. ----


def _move_local(cache, source: jax.Array, start: jax.Array):
  """Every layer's local cache with slots start[b] .. of row b holding what
  slots source[b, :] held (all read first)."""

  def move(array):
    taken = jax.vmap(lambda c, s: jnp.take(c, s, axis=0))(array, source)
    return jax.vmap(lambda c, t, i: jax.lax.dynamic_update_slice_in_dim(c, t, i, axis=0))(
      array, taken, start
    )

  return jax.tree.map(move, cache)


def _select(pick: jax.Array, new, old):
  """Per row (pick [batch]): new where pick, else old, for a pytree."""

  def sel(a, b):
    return jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b)

  return jax.tree.map(sel, new, old)


def _block_speculate(
  model: BlockTransformer,
  draft_fn,
  num_beams: int,
  draft_len: int,
  max_new_tokens: int,
  params,
  tokens,
  pad,
  eos_id,
  sampling: Optional[SamplingConfig] = None,
  rng: Optional[jax.Array] = None,
  cross_blocks: bool = False,
):
  """The loop; sampling None (or greedy) verifies greedily, otherwise by
  recursive rejection sampling over sampled drafts: draft_fn then also takes
  a key and returns (beams [B, M, C+1], q log-probs [B, M, C, V]).
  cross_blocks: drafts may cross the block boundary (`step_cross`)."""
  cfg: BlockConfig = model.config
  sampled = sampling is not None and not sampling.greedy
  if sampled and rng is None:
    raise ValueError("speculative sampling needs an rng key")
  if rng is None:
    rng = jax.random.key(0)
  block_len = cfg.block_len
  prefix = cfg.token_decoder == "prefix"
  first_len = cfg.prefix_len if prefix else 1  # local slots before t_0's input
  depth_len = draft_len + 1
  packed_len = num_beams * depth_len
  # Committed local slots are first_len + j (j = g_0's index in its block,
  # at most L_B - 1); the packed tree is written after them.
  local_len = first_len + block_len - 1 + packed_len
  decoder = BlockDecoder(model)
  batch, prompt_len = tokens.shape
  num_blocks = cfg.num_steps(max_new_tokens) + 1
  cache_len = prompt_len // block_len + num_blocks  # committed global slots
  # Crossing: one spare committed slot, then M scratch slots for the
  # candidate blocks (written at scratch .. scratch + M - 1 each step).
  scratch = cache_len + 1
  prefill = decoder.prefill(
    params, tokens, pad, num_blocks + (1 + num_beams if cross_blocks else 0)
  )
  if cross_blocks:
    cache_len = scratch
  # Past-boundary drafts that count: the new g_0 stays inside the next block.
  past_len = min(draft_len, block_len - 1)
  pad_blocks = pad // block_len
  out_len = max_new_tokens + depth_len
  rows = jnp.arange(batch)
  local_slots = jnp.arange(local_len)
  apply = functools.partial(model.apply, {"params": params})

  def pick_token(logits, key):
    if sampled:
      return jax.random.categorical(key, restrict_logits(logits, sampling), axis=-1).astype(
        jnp.int32
      )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def token_inputs(ids, slots, expanded):
    """The token decoder's input for token ids [B, q] going in at local slots [B, q]."""
    x = apply(ids, method=BlockTransformer.embed_tokens)
    if cfg.token_decoder == "summation":  # the input at slot k adds expansion vector k
      at = jnp.clip(slots, 0, block_len - 1)
      x = x + jnp.take_along_axis(expanded, at[:, :, None], axis=1)
    return x

  def first_pass(context, past=None):
    """Expansion of `context` [N, block_width] and the token decoder's first
    pass for the block after it on a fresh local cache, followed by `past`
    [N, X] (draft tokens of that block, at local slots first_len ..):
    (expanded, local cache, logits [N, first_len + X, V], hidden)."""
    rows_n = context.shape[0]
    expanded = apply(context, method=BlockTransformer.expand)  # [N, E, width]
    memory = None
    if prefix:
      first = expanded
    else:
      bos = apply(
        jnp.full((rows_n, 1), cfg.bos_id, jnp.int32), method=BlockTransformer.embed_tokens
      )
      if cfg.token_decoder == "summation":
        first = bos + expanded[:, :1]
      else:
        first, memory = bos, expanded
    if past is not None:
      past_slots = jnp.broadcast_to(first_len + jnp.arange(past.shape[1]), past.shape)
      first = jnp.concatenate([first, token_inputs(past, past_slots, expanded)], axis=1)
    slots = jnp.arange(first.shape[1])
    local = caches_lib.init_stack_cache(cfg.token_stack, rows_n, local_len, cfg.compute_dtype)
    window = caches_lib.local_window(rows_n, 0, local_len) if first.shape[1] == 1 else None
    logits, local, hidden = apply(
      first,
      slots,
      local,
      0,
      caches_lib.local_mask(slots, local_len),
      memory,
      window,
      method=_token_forward,
    )
    return expanded, local, logits, hidden

  def start_block(context, key):
    """The token decoder's first pass for the block after `context` [B,
    block_width], on a fresh local cache: (expanded, local cache, t_0, h)."""
    expanded, local, logits, hidden = first_pass(context)
    return expanded, local, pick_token(logits[:, -1], key), hidden[:, -1]

  prefill_key, rng = jax.random.split(rng)
  expanded, local, g0, hidden = start_block(prefill["context"], prefill_key)
  state = {
    "block_cache": prefill["cache"],
    "block_slot": jnp.full((batch,), prompt_len // block_len, jnp.int32),  # next global slot
    "expanded": expanded,
    "local": local,
    "j": jnp.zeros((batch,), jnp.int32),  # g_0's index in its block
    "block": jnp.zeros((batch, block_len + depth_len), jnp.int32),  # the block so far
    "g0": g0,
    "hidden": hidden,
    "out": jnp.full((batch, out_len), cfg.pad_id, jnp.int32),
    "n_out": jnp.zeros((batch,), jnp.int32),
    "done": jnp.zeros((batch,), bool),
    "step": jnp.int32(0),
    "row_steps": jnp.zeros((batch,), jnp.int32),
    "accepted": jnp.zeros((batch,), jnp.int32),
  }
  if cross_blocks:
    state["crossings"] = jnp.zeros((batch,), jnp.int32)

  def draft(state, key):
    """Beams [B, M, C+1] (g_0 first) and, when sampled, their q log-probs
    (key folded with 0)."""
    if sampled:
      beams, q_logprobs = draft_fn(
        state["hidden"], state["g0"], state["n_out"], state["step"], jax.random.fold_in(key, 0)
      )
    else:
      beams = draft_fn(state["hidden"], state["g0"], state["n_out"], state["step"])
      q_logprobs = None
    beams = beams.astype(jnp.int32)
    if beams.shape[1:] != (num_beams, depth_len):
      raise ValueError(
        f"draft_fn returned beams of shape {beams.shape}; expected "
        f"[batch, {num_beams}, {depth_len}] (num_beams, draft_len + 1)"
      )
    return beams, q_logprobs

  def tree_forward(state, tree):
    """The in-block verify forward over the packed tree: (logits [B, P, V],
    hidden [B, P, width], local cache with the tree after the committed
    slots)."""
    length = first_len + state["j"]
    context = local_slots[None, :] < length[:, None]
    relative = local_slots[None, :] - length[:, None]
    in_tree = (relative >= 0) & (relative < packed_len)
    tree_visible = jnp.take_along_axis(
      tree.mask,
      jnp.broadcast_to(
        jnp.clip(relative, 0, packed_len - 1)[:, None, :], (batch, packed_len, local_len)
      ),
      axis=2,
    )
    mask = context[:, None, :] | (tree_visible & in_tree[:, None, :])
    slots = length[:, None] + tree.depth
    memory = state["expanded"] if cfg.token_decoder == "cross_attention" else None
    logits, local, hidden = apply(
      token_inputs(tree.tokens, slots, state["expanded"]),
      slots,
      state["local"],
      length,
      mask,
      memory,
      (jnp.zeros((batch,), jnp.int32), length),
      method=_token_forward,
    )
    return logits, hidden, local

  def verify(state, cap, key):
    """Draft, pack, one token-decoder forward over the tree, accept (at most
    `cap` [B] drafts per row): (committed [B, D], accepted [B], the token
    after them [B], its h [B, width], local cache with the chosen beam's
    K/V at the committed slots)."""
    length = first_len + state["j"]  # committed local slots
    beams, q_logprobs = draft(state, key)
    tree = batched_pack_beams(beams)
    logits, hidden, local = tree_forward(state, tree)
    if sampled:
      best, num_accepted, next_token = _accept_sampled(
        logits, tree.unpacker, beams, q_logprobs, sampling, jax.random.fold_in(key, 1)
      )
      num_accepted = jnp.minimum(num_accepted, cap)  # a prefix of an exact sequence
    else:
      predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, P]
      beam_predicted = jax.vmap(lambda p, u: p[u])(predicted, tree.unpacker)
      matches = beam_predicted[:, :, :draft_len] == beams[:, :, 1:]
      matches &= (jnp.arange(draft_len)[None, :] < cap[:, None])[:, None, :]
      accepted = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)
      best = jnp.argmax(accepted, axis=-1)
      num_accepted = accepted[rows, best]
    best_slots = tree.unpacker[rows, best]  # [B, D]
    local = _move_local(local, length[:, None] + best_slots, length)
    next_at = best_slots[rows, num_accepted]
    if not sampled:
      next_token = predicted[rows, next_at]
    return beams[rows, best], num_accepted, next_token, hidden[rows, next_at], local

  def no_verify(state, cap, key):
    """Every active row's g_0 ends its block: nothing to draft or verify."""
    del cap, key
    committed = jnp.full((batch, depth_len), cfg.pad_id, jnp.int32).at[:, 0].set(state["g0"])
    return (committed, jnp.zeros((batch,), jnp.int32), state["g0"], state["hidden"], state["local"])

  def next_block(state, block, complete, key):
    """For the rows whose block is complete: one block-decoder step at the
    row's own global slot, then the first pass of the next block."""
    slot = state["block_slot"]
    positions = (slot - pad_blocks)[:, None]
    global_slots = jnp.arange(cache_len)
    mask = (
      (global_slots[None, :] >= pad_blocks[:, None]) & (global_slots[None, :] <= slot[:, None])
    )[:, None, :]
    context, cache = apply(
      block[:, None, :],
      positions,
      state["block_cache"],
      slot,
      mask,
      method=BlockTransformer.encode_blocks,
      window=(pad_blocks.astype(jnp.int32), slot + 1),
    )
    expanded, local, g0, hidden = start_block(context[:, 0], key)
    new = {"block_cache": cache, "expanded": expanded, "local": local, "g0": g0, "hidden": hidden}
    old = {name: state[name] for name in new}
    # Rows that did not complete a block wrote their next global slot, which
    # they never read before writing it again.
    new = dict(_select(complete, new, old), block_cache=cache)
    return new

  def keep_blocks(state, block, complete, key):
    del block, complete, key
    return {name: state[name] for name in ("block_cache", "expanded", "local", "g0", "hidden")}

  def step(state):
    done, j = state["done"], state["j"]
    active = ~done
    key = jax.random.fold_in(rng, state["step"])
    cap = jnp.minimum(draft_len, block_len - 1 - j)  # drafts left in the block
    committed, num_accepted, next_token, next_hidden, local = jax.lax.cond(
      jnp.any(active & (cap > 0)), verify, no_verify, state, cap, jax.random.fold_in(key, 0)
    )
    block = jax.vmap(lambda b, c, i: jax.lax.dynamic_update_slice_in_dim(b, c, i, axis=0))(
      state["block"], committed, j
    )
    new_j = j + num_accepted + 1
    complete = active & (new_j == block_len)
    within = {"local": local, "g0": next_token, "hidden": next_hidden}
    state_in = dict(state, **within)
    after = jax.lax.cond(
      jnp.any(complete),
      next_block,
      keep_blocks,
      state_in,
      block[:, :block_len],
      complete,
      jax.random.fold_in(key, 1),
    )
    # Output: g0 and the accepted drafts; cut at the first EOS and at max_new.
    out, n_out, new_done = _append_output(state, committed, num_accepted, eos_id, max_new_tokens)
    moved = {name: after[name] for name in ("expanded", "local", "g0", "hidden")}
    return dict(
      _select(active, moved, {name: state[name] for name in moved}),
      block_cache=after["block_cache"],
      block_slot=state["block_slot"] + complete.astype(jnp.int32),
      j=jnp.where(active, jnp.where(complete, 0, new_j), j),
      block=jnp.where(active[:, None], block, state["block"]),
      out=out,
      n_out=n_out,
      done=new_done,
      step=state["step"] + 1,
      row_steps=state["row_steps"] + active.astype(jnp.int32),
      accepted=state["accepted"] + jnp.where(active, num_accepted, 0),
    )

  # ---- Step two: drafts that cross the block boundary. ----

  def no_tree_forward(state, tree):
    """Every active row's g_0 ends its block: no in-block drafts."""
    del tree
    return (
      jnp.zeros((batch, packed_len, cfg.vocab_size), jnp.float32),
      jnp.zeros((batch, packed_len, cfg.token_width), state["hidden"].dtype),
      state["local"],
    )

  candidate_len = first_len + past_len  # the candidates' token-decoder queries

  def candidates(state, beams, cap):
    """Per beam m, the candidate block (committed tokens, g_0, d_1..d_cap)
    through one block-decoder step at the row's next global slot's position,
    its K/V at scratch slot m, seeing the committed slots and itself; then
    the token decoder's first pass on the candidate's context followed by
    the beam's past-boundary drafts d_{cap+1}.. on a fresh local cache.
    Returns (block cache, expanded [B, M, E, width], local caches [B*M],
    logits [B, M, candidate_len, V], hidden [B, M, candidate_len, width]);
    entry first_len - 1 + k predicts the next block's token k."""
    j, slot = state["j"], state["block_slot"]
    blocks = jax.vmap(
      lambda b, m, i: jax.vmap(
        lambda t: jax.lax.dynamic_update_slice_in_dim(b, t, i, axis=0)[:block_len]
      )(m)
    )(state["block"], beams, j)  # [B, M, L_B]
    positions = jnp.broadcast_to((slot - pad_blocks)[:, None], (batch, num_beams))
    read = jnp.arange(scratch + num_beams)
    committed = (read[None, :] >= pad_blocks[:, None]) & (read[None, :] < slot[:, None])
    own = read[None, :] == scratch + jnp.arange(num_beams)[:, None]  # [M, S]
    mask = committed[:, None, :] | own[None, :, :]
    context, block_cache = apply(
      blocks,
      positions,
      state["block_cache"],
      scratch,
      mask,
      method=BlockTransformer.encode_blocks,
      window=(pad_blocks.astype(jnp.int32), slot),
    )
    many = batch * num_beams
    past = None
    if past_len:
      at = jnp.clip(cap[:, None] + 1 + jnp.arange(past_len)[None, :], 0, draft_len)  # [B, X]
      past = jnp.take_along_axis(
        beams, jnp.broadcast_to(at[:, None, :], (batch,) + (num_beams, past_len)), axis=2
      ).reshape(many, past_len)
    expanded, local, logits, hidden = first_pass(context.reshape(many, cfg.block_width), past)
    return (
      block_cache,
      expanded.reshape(batch, num_beams, cfg.num_expanded, cfg.token_width),
      local,
      logits.reshape(batch, num_beams, candidate_len, cfg.vocab_size),
      hidden.reshape(batch, num_beams, candidate_len, cfg.token_width),
    )

  def no_candidates(state, beams, cap):
    del beams, cap
    many = batch * num_beams
    return (
      state["block_cache"],
      jnp.zeros((batch, num_beams, cfg.num_expanded, cfg.token_width), state["expanded"].dtype),
      caches_lib.init_stack_cache(cfg.token_stack, many, local_len, cfg.compute_dtype),
      jnp.zeros((batch, num_beams, candidate_len, cfg.vocab_size), jnp.float32),
      jnp.zeros((batch, num_beams, candidate_len, cfg.token_width), state["hidden"].dtype),
    )

  def step_cross(state):
    done, j = state["done"], state["j"]
    active = ~done
    key = jax.random.fold_in(rng, state["step"])
    cap = jnp.minimum(draft_len, block_len - 1 - j)  # in-block drafts
    cross = active & (draft_len > cap)  # every beam reaches the block's end
    limit = jnp.minimum(draft_len, cap + past_len)  # = cap where no beam crosses
    beams, q_logprobs = draft(state, jax.random.fold_in(key, 0))
    tree = batched_pack_beams(beams)
    tree_logits, tree_hidden, tree_local = jax.lax.cond(
      jnp.any(active & (cap > 0)), tree_forward, no_tree_forward, state, tree
    )
    block_cache, cand_expanded, cand_local, cand_logits, cand_hidden = jax.lax.cond(
      jnp.any(cross), candidates, no_candidates, state, beams, cap
    )
    # Per beam and depth i, the target after d_i: the in-block forward while
    # the next token is in the block (i < L_B - 1 - j), then the beam's
    # candidate forward (there cap = L_B - 1 - j).
    room = (block_len - 1 - j)[:, None, None]
    depth = jnp.arange(depth_len)[None, None, :]
    in_block = depth < room  # [B, 1, D]
    at = jnp.clip(first_len - 1 + depth - room, 0, candidate_len - 1)
    at = jnp.broadcast_to(at, (batch, num_beams, depth_len))

    def per_beam(packed, cand):
      from_tree = jax.vmap(lambda x, u: x[u])(packed, tree.unpacker)  # [B, M, D, ...]
      from_cand = jnp.take_along_axis(cand, at.reshape(at.shape + (1,) * (cand.ndim - 3)), axis=2)
      return jnp.where(
        in_block.reshape(in_block.shape + (1,) * (cand.ndim - 3)), from_tree, from_cand
      )

    logits = per_beam(tree_logits, cand_logits)  # [B, M, D, V]
    hidden = per_beam(tree_hidden, cand_hidden)  # [B, M, D, width]
    if sampled:
      identity = jnp.broadcast_to(
        jnp.arange(num_beams * depth_len).reshape(num_beams, depth_len),
        (batch, num_beams, depth_len),
      )
      best, num_accepted, next_token = _accept_sampled(
        logits.reshape(batch, num_beams * depth_len, cfg.vocab_size),
        identity,
        beams,
        q_logprobs,
        sampling,
        jax.random.fold_in(key, 1),
        limit,
      )
    else:
      predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, M, D]
      matches = predicted[:, :, :draft_len] == beams[:, :, 1:]
      matches &= (jnp.arange(draft_len)[None, :] < limit[:, None])[:, None, :]
      accepted = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)
      best = jnp.argmax(accepted, axis=-1)
      num_accepted = accepted[rows, best]
      next_token = predicted[rows, best, num_accepted]
    next_hidden = hidden[rows, best, num_accepted]
    committed = beams[rows, best]
    crossed = cross & (num_accepted >= cap)  # the accepted path completes the block
    length = first_len + j
    best_slots = tree.unpacker[rows, best]
    local = _move_local(tree_local, length[:, None] + best_slots, length)
    block = jax.vmap(lambda b, c, i: jax.lax.dynamic_update_slice_in_dim(b, c, i, axis=0))(
      state["block"], committed, j
    )
    new_j = j + num_accepted + 1
    complete = active & ~crossed & (new_j == block_len)  # completed in the block
    state_in = dict(state, block_cache=block_cache, local=local, g0=next_token, hidden=next_hidden)
    after = jax.lax.cond(
      jnp.any(complete),
      next_block,
      keep_blocks,
      state_in,
      block[:, :block_len],
      complete,
      jax.random.fold_in(key, 2),
    )
    # Crossed rows: the chosen candidate's block K/V to the row's slot (after
    # next_block, which writes every row's next slot), its expansion and
    # local cache.
    slot = state["block_slot"]

    def take_candidate(array):
      moved = array[rows, scratch + best]
      return array.at[rows, slot].set(
        jnp.where(crossed.reshape((batch,) + (1,) * (moved.ndim - 1)), moved, array[rows, slot])
      )

    block_cache = jax.tree.map(take_candidate, after["block_cache"])
    chosen_local = jax.tree.map(
      lambda a: a.reshape((batch, num_beams) + a.shape[1:])[rows, best], cand_local
    )
    crossing = {
      "expanded": cand_expanded[rows, best],
      "local": chosen_local,
      "g0": next_token,
      "hidden": next_hidden,
    }
    moved = _select(crossed, crossing, {name: after[name] for name in crossing})
    out, n_out, new_done = _append_output(state, committed, num_accepted, eos_id, max_new_tokens)
    # The next block so far: the accepted drafts past the boundary.
    next_block_tokens = jnp.pad(block[:, block_len:], ((0, 0), (0, block_len)))
    block = jnp.where(crossed[:, None], next_block_tokens, block)
    return dict(
      _select(active, moved, {name: state[name] for name in moved}),
      block_cache=block_cache,
      block_slot=slot + (complete | crossed).astype(jnp.int32),
      j=jnp.where(active, jnp.where(crossed, num_accepted - cap, jnp.where(complete, 0, new_j)), j),
      block=jnp.where(active[:, None], block, state["block"]),
      out=out,
      n_out=n_out,
      done=new_done,
      step=state["step"] + 1,
      row_steps=state["row_steps"] + active.astype(jnp.int32),
      accepted=state["accepted"] + jnp.where(active, num_accepted, 0),
      crossings=state["crossings"] + crossed.astype(jnp.int32),
    )

  def cond(state):
    return ~jnp.all(state["done"]) & (state["step"] < max_new_tokens)

  state = jax.lax.while_loop(cond, step_cross if cross_blocks else step, state)
  positions = jnp.arange(max_new_tokens)[None, :]
  tokens_out = jnp.where(
    positions < state["n_out"][:, None], state["out"][:, :max_new_tokens], cfg.pad_id
  )
  return SpeculativeOutput(
    tokens=tokens_out,
    lengths=state["n_out"],
    steps=state["step"],
    row_steps=state["row_steps"],
    accepted=state["accepted"],
    crossings=state.get("crossings"),
  )


def block_speculative_generate_fn(
  model: BlockTransformer,
  draft_fn: DraftFn,
  *,
  num_beams: int,
  draft_len: int,
  max_new_tokens: int,
  cross_blocks: bool = True,
):
  """The jitted greedy loop with any draft function: f(params, tokens
  [B, prompt_len], pad [B], eos_id) -> SpeculativeOutput. draft_fn(hidden,
  g0, n_out, step) must return [B, num_beams, draft_len + 1] (g0 first).
  cross_blocks: drafts may cross the block boundary (False: within the
  block only)."""
  _check(model, num_beams=num_beams, draft_len=draft_len, max_new_tokens=max_new_tokens)
  return jax.jit(
    functools.partial(
      _block_speculate,
      model,
      draft_fn,
      num_beams,
      draft_len,
      max_new_tokens,
      cross_blocks=cross_blocks,
    )
  )


@functools.lru_cache(maxsize=16)
def block_drafter_generate_fn(
  model: BlockTransformer,
  drafter: DraftHead,
  beam_width: int,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  draft_top_k: Optional[int] = None,
  cross_blocks: bool = True,
):
  """The jitted loop with the draft head: f(params, drafter_params, tokens,
  pad, eos_id, rng) -> SpeculativeOutput. Cached: one compile per (model,
  drafter, beams, max_new, sampling, top-k, cross_blocks)."""

  def run(params, drafter_params, tokens, pad, eos_id, rng):
    draft_fn = make_draft_fn(drafter, drafter_params, params, sampling, beam_width, draft_top_k)
    return _block_speculate(
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
      cross_blocks,
    )

  return jax.jit(run)


def block_speculative_generate(
  model: BlockTransformer,
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
  draft_top_k: Optional[int] = None,
  recorded_base: Optional[Mapping[str, Any]] = None,
  cross_blocks: bool = True,
) -> SpeculativeOutput:
  """`speculative_generate` for a Block Transformer base model: drafts
  verified by the token decoder, across the block boundary with
  cross_blocks (the default; candidate blocks through the block decoder),
  else within the current block (module docstring). Greedy `sampling`
  gives the tokens of greedy `bt_jax.inference.generate`; otherwise every
  token is distributed as plain sampling under `sampling`. beam_width:
  beams (greedy, default 4) or sampled drafts (default 1). Of a drafter's
  draft_len, at most what the block has left counts each step, plus (with
  cross_blocks) L_B - 1 past its end. recorded_base: drafter.json's
  "base_model" (`load_drafter`'s metadata), checked with the drafter's
  config against the model (`check_block_drafter_fits`). One device."""
  if beam_width is None:
    beam_width = 4 if sampling.greedy else 1
  _check(model, beam_width=beam_width, max_new_tokens=max_new_tokens)
  check_block_drafter_fits(drafter, model.config, recorded_base)
  if sampling.greedy:
    check_beam_width(beam_width, drafter.config.vocab_size)
  elif draft_top_k is not None:
    raise ValueError(
      "draft_top_k cuts the drafter's logits before beam search (greedy); "
      "sampled drafts use the sampling config's top_k"
    )
  batch = prepare_prompts(prompts, model.config, max_new_tokens)
  fn = block_drafter_generate_fn(
    model, drafter, beam_width, max_new_tokens, sampling, draft_top_k, cross_blocks
  )
  return fn(
    params,
    drafter_params,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.pad),
    jnp.int32(-1 if eos_id is None else eos_id),
    jax.random.key(seed),
  )
