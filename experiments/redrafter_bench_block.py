"""The Block Transformer base of `experiments.redrafter_bench` (`--base
block`): ReDrafter (arXiv 2403.09919) drafting for the token decoder of a
Block Transformer (arXiv 2406.02657) through the public API of
`bt_jax.redrafter.block_speculative` (docs/redrafter.md, "A Block
Transformer base model").

- `random_block_model`: the random-weight fallback without `--workdir`;
- `distill_block_drafter`: a drafter trained on the base model's greedy
  continuations of corpus prompts (`DistillationData.generate`, the prompts
  no targets), hard labels (`train_block_drafter`);
- `step_records`: per-step acceptance and tree sizes. The block loop's
  `SpeculativeOutput` carries no per-step records (its step_accepted /
  step_tree_tokens are None), so a second, untimed run of the loop
  (`block_speculative_generate_fn`) drafts through the same draft function
  wrapped to hand each step's beams and output counts to the host
  (`jax.debug.callback`); the accepted count of a row-step is then the
  longest beam prefix that agrees with greedy decoding's tokens (what
  greedy verification accepts, the loop's output being greedy's), capped
  at what the block has left (within the block, cross_blocks=False) or at
  that plus min(C, L_B - 1) past the boundary (cross_blocks=True, where
  every step drafts: the limit of `block_speculative`'s `step_cross`). The derivation is checked against the loop's
  own totals (accepted, row_steps) and its recorded output counts:
  `records_consistent`;
- `block_split`: standalone pieces of a speculative step at the loop's
  shapes, each jitted apart and timed with `block_until_ready`: drafting
  (`make_draft_fn`'s beam search), the token decoder's verify forward over
  the packed tree, the block-decoder step (one `encode_blocks` step, the
  expansion and the token decoder's first pass on a fresh local cache) and a
  plain greedy token-decoder step. They are not the loop's own closures
  (those cannot be called apart), but the same model calls at the same
  shapes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bt_jax.config import BlockConfig
from bt_jax.inference import SamplingConfig
from bt_jax.inference import caches as caches_lib
from bt_jax.inference.decoding import BlockDecoder
from bt_jax.models import build_model, init_params
from bt_jax.models.block import BlockTransformer
from bt_jax.redrafter import DrafterConfig, DraftHead, corpus_windows, init_drafter
from bt_jax.redrafter.block_speculative import block_speculative_generate_fn, train_block_drafter
from bt_jax.redrafter.speculative import make_draft_fn
from bt_jax.redrafter.train import DistillationData
from bt_jax.redrafter.tree import batched_pack_beams

# The random fallback: a small Block Transformer (L_B = 4) on a byte vocabulary.
RANDOM_CONFIG = BlockConfig(
  vocab_size=257,
  max_len=256,
  block_len=4,
  block_layers=2,
  block_width=64,
  token_layers=2,
  token_width=64,
)

SPLIT_METHOD = (
  "standalone pieces at the loop's shapes (not the loop's own closures), each jitted apart, "
  "per iteration of a jitted loop of piece_iterations, block_until_ready, median over "
  "piece_repeats calls; bookkeeping_ms is the loop's step "
  "minus the pieces' per-step estimate (a residual: negative when the pieces run apart cost "
  "more than inside the loop)"
)
SPLIT_KEYS = (
  "method",
  "prefill_ms",
  "draft_ms",
  "verify_ms",
  "block_step_ms",
  "block_steps_per_step",
  "verify_steps_per_step",
  "greedy_token_step_ms",
  "piece_iterations",
  "pieces_per_step_ms",
  "loop_step_ms",
  "greedy_step_ms",
  "bookkeeping_ms",
  "verify_over_greedy_token_step",
  "piece_repeats",
)
NO_RECORDS = (
  "the block loop's SpeculativeOutput has no per-step records; derived from an instrumented "
  "rerun, which did not agree with the loop's totals"
)


def random_block_model():
  model = build_model(RANDOM_CONFIG)
  return model, init_params(model, jax.random.key(0))


def distill_block_drafter(
  model: BlockTransformer,
  params,
  tokenizer,
  documents,
  *,
  draft_len: int,
  num_prompts: int,
  prompt_len: int,
  continuation_len: int,
  batch_size: int,
  steps: int,
  learning_rate: float,
  seed: int = 0,
):
  """A drafter (`DrafterConfig.for_base`: the token decoder's width) trained
  with hard labels on prompt + the base model's greedy continuation, the
  prompts masked out of the targets. Prompts are rounded up to whole blocks
  so that the training rows' blocks are the ones decoding makes; rows are
  right-padded to whole blocks (no targets there). Returns (drafter, params,
  losses)."""
  block_len = model.config.block_len
  prompt_len = -(-prompt_len // block_len) * block_len
  rng = np.random.default_rng(seed)
  prompts = corpus_windows(tokenizer, documents, num_prompts, prompt_len, rng)
  data = DistillationData.generate(
    model,
    params,
    prompts,
    continuation_len=continuation_len,
    eos_id=getattr(tokenizer, "eos_id", None),
  )
  width = -(-data.tokens.shape[1] // block_len) * block_len
  extra = ((0, 0), (0, width - data.tokens.shape[1]))
  tokens = np.pad(data.tokens, extra)
  target_mask = np.pad(data.target_mask, extra)
  drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=draft_len))
  drafter_params, losses = train_block_drafter(
    model,
    params,
    drafter,
    init_drafter(drafter, jax.random.key(seed + 1)),
    tokens,
    steps=steps,
    learning_rate=learning_rate,
    target_mask=target_mask,
    batch_size=batch_size,
    seed=seed,
  )
  return drafter, drafter_params, losses


# ---- Per-step records from an instrumented rerun. ----


def _leading_matches(draft: np.ndarray, reference: np.ndarray) -> int:
  n = 0
  for a, b in zip(draft, reference):
    if a != b:
      break
    n += 1
  return n


def step_records(
  model: BlockTransformer,
  drafter: DraftHead,
  drafter_params,
  params,
  beam_width: int,
  max_new_tokens: int,
  tokens,
  pad,
  out,
  reference: np.ndarray,
  cross_blocks: bool = True,
  draft_fn=None,
) -> dict[str, Any]:
  """step_accepted [B, steps] (-1 where a row had finished) and
  step_tree_tokens [B, steps] (the packed tree's tokens after the prefix
  dedupe; 0 on steps without a verify forward), derived as the module
  docstring says; `consistent` whether they agree with `out` (the loop's
  SpeculativeOutput) and the rerun's recorded output counts. reference:
  greedy tokens [B, >= max_new_tokens + draft_len] (past max_new, so that a
  step's accepted count is known up to the output's end). cross_blocks:
  the loop's, as the timed run's. draft_fn: the draft function to
  instrument (default the drafter's beam search, `make_draft_fn`)."""
  draft_len = drafter.config.draft_len
  block_len = model.config.block_len
  inner = draft_fn or make_draft_fn(drafter, drafter_params, params, SamplingConfig(), beam_width)
  seen: dict[int, tuple] = {}

  def keep(step, n_out, beams):
    seen[int(step)] = (np.asarray(n_out), np.asarray(beams))

  def draft(hidden, g0, n_out, step):
    beams = inner(hidden, g0, n_out, step)
    jax.debug.callback(keep, step, n_out, beams)
    return beams

  fn = block_speculative_generate_fn(
    model,
    draft,
    num_beams=beam_width,
    draft_len=draft_len,
    max_new_tokens=max_new_tokens,
    cross_blocks=cross_blocks,
  )
  rerun = fn(params, tokens, pad, jnp.int32(-1))
  jax.block_until_ready(rerun)
  steps = int(rerun.steps)
  batch = reference.shape[0]
  accepted = np.full((batch, steps), -1, np.int64)
  tree = np.zeros((batch, steps), np.int64)
  consistent = bool(np.array_equal(np.asarray(rerun.tokens), np.asarray(out.tokens)))
  for b in range(batch):
    n = 0
    for s in range(steps):
      if n >= max_new_tokens:
        break
      if s in seen:
        n_out, beams = seen[s]
        consistent &= int(n_out[b]) == n
        row = beams[b]  # [M, C + 1], g0 first
        consistent &= bool(np.all(row[:, 0] == reference[b, n]))
        cap = min(draft_len, block_len - 1 - n % block_len)
        if cross_blocks:  # past the boundary, the new g_0 stays in the next block
          cap = min(draft_len, cap + min(draft_len, block_len - 1))
        best = max(_leading_matches(m[1:], reference[b, n + 1 :]) for m in row)
        accepted[b, s] = min(cap, best)
        tree[b, s] = len({tuple(m[: d + 1]) for m in row for d in range(draft_len + 1)})
      else:  # no verify forward: g0 ended its block
        consistent &= n % block_len == block_len - 1
        accepted[b, s] = 0
      n += int(accepted[b, s]) + 1
  active = accepted >= 0
  consistent &= bool(np.array_equal(active.sum(1), np.asarray(out.row_steps)))
  consistent &= bool(np.array_equal(np.where(active, accepted, 0).sum(1), np.asarray(out.accepted)))
  consistent &= steps == int(out.steps)
  return dict(step_accepted=accepted, step_tree_tokens=tree, consistent=consistent)


def block_acceptance_stats(
  step_accepted: np.ndarray, step_tree_tokens: np.ndarray, beam_width: int, draft_len: int
) -> dict[str, Any]:
  """As `redrafter_bench.acceptance_stats`, except that the tree tokens and
  the dedupe share are over the row-steps that ran the verify forward (a
  step whose g0 ends its block verifies nothing)."""
  active = step_accepted >= 0
  count = max(1, int(active.sum()))
  accepted = step_accepted[active]
  verified = active & (step_tree_tokens > 0)
  tree_tokens = float(step_tree_tokens[verified].sum()) / max(1, int(verified.sum()))
  return dict(
    acceptance_by_depth=[float((accepted >= d).sum()) / count for d in range(1, draft_len + 1)],
    mean_accepted=float(accepted.sum()) / count,
    tree_tokens_per_step=tree_tokens,
    dedupe_removed=1.0 - tree_tokens / (beam_width * (draft_len + 1)),
  )


# ---- Standalone pieces of one step. ----


def _first_len(cfg: BlockConfig) -> int:
  return cfg.prefix_len if cfg.token_decoder == "prefix" else 1


def _start_block(module: BlockTransformer, context, local_len: int):
  """Expansion and the token decoder's first pass on a fresh local cache of
  local_len slots: (expanded, local cache, g0 [B], h [B, width])."""
  cfg = module.config
  batch = context.shape[0]
  expanded = module.expand(context)
  local = caches_lib.init_stack_cache(cfg.token_stack, batch, local_len, cfg.compute_dtype)
  memory = None
  if cfg.token_decoder == "prefix":
    first = expanded
  else:
    bos = module.embed_tokens(jnp.full((batch, 1), cfg.bos_id, jnp.int32))
    if cfg.token_decoder == "summation":
      first = bos + expanded[:, :1]
    else:
      first, memory = bos, expanded
  slots = jnp.arange(first.shape[1])
  window = caches_lib.local_window(batch, 0, local_len) if first.shape[1] == 1 else None
  hidden, local = module.token_decoder(
    first,
    slots,
    memory=memory,
    mask=caches_lib.local_mask(slots, local_len),
    caches=local,
    cache_index=0,
    window=window,
  )
  logits = module.lm_head(hidden[:, -1]).astype(jnp.float32)
  return expanded, local, jnp.argmax(logits, -1).astype(jnp.int32), hidden[:, -1]


def _block_step(module: BlockTransformer, block, cache, slot, pad_blocks, local_len: int):
  """One block-decoder step for block [B, L_B] at global slot [B], then
  `_start_block` on its context embedding."""
  cache_len = jax.tree.leaves(cache)[0].shape[1]
  global_slots = jnp.arange(cache_len)
  mask = (
    (global_slots[None, :] >= pad_blocks[:, None]) & (global_slots[None, :] <= slot[:, None])
  )[:, None, :]
  context, cache = module.encode_blocks(
    block[:, None, :],
    (slot - pad_blocks)[:, None],
    cache,
    slot,
    mask,
    window=(pad_blocks.astype(jnp.int32), slot + 1),
  )
  return _start_block(module, context[:, 0], local_len) + (cache,)


def _tree_forward(module: BlockTransformer, ids, slots, local, length, mask, expanded):
  """The token decoder over the packed tree ids [B, P] at local slots [B, P],
  written at slots length [B] ..: (logits, local cache, hidden)."""
  cfg = module.config
  x = module.embed_tokens(ids)
  if cfg.token_decoder == "summation":
    at = jnp.clip(slots, 0, cfg.block_len - 1)
    x = x + jnp.take_along_axis(expanded, at[:, :, None], axis=1)
  memory = expanded if cfg.token_decoder == "cross_attention" else None
  hidden, local = module.token_decoder(
    x,
    slots,
    memory=memory,
    mask=mask,
    caches=local,
    cache_index=length,
    window=(jnp.zeros_like(length), length),
  )
  return module.lm_head(hidden).astype(jnp.float32), local, hidden


def _greedy_token(module: BlockTransformer, token, slot, local, expanded):
  """Plain greedy decoding's token-decoder step: token [B] in at local slot
  `slot` (a cache of token_decoder_len slots), the next token out."""
  cfg = module.config
  batch, local_len = token.shape[0], cfg.token_decoder_len
  x = module.embed_tokens(token[:, None])
  if cfg.token_decoder == "summation":
    x = x + jax.lax.dynamic_slice_in_dim(expanded, slot - _first_len(cfg) + 1, 1, axis=1)
  memory = expanded if cfg.token_decoder == "cross_attention" else None
  hidden, local = module.token_decoder(
    x,
    slot[None],
    memory=memory,
    mask=caches_lib.local_mask(slot[None], local_len),
    caches=local,
    cache_index=slot,
    window=caches_lib.local_window(batch, slot, local_len),
  )
  logits = module.lm_head(hidden[:, -1]).astype(jnp.float32)
  return jnp.argmax(logits, -1).astype(jnp.int32), local


def _median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _per_iteration_ms(body, consts, carry, iterations: int, repeats: int) -> float:
  """Median ms per iteration of carry = body(consts, carry), run `iterations`
  times in one jitted `fori_loop` (a call's dispatch and argument handling
  amortized, as in the loop; each iteration depends on the last through
  the carry, so none is hoisted)."""
  run = jax.jit(
    lambda consts, carry: jax.lax.fori_loop(0, iterations, lambda _, c: body(consts, c), carry)
  )
  return _median_ms(run, (consts, carry), repeats) / iterations


PIECE_ITERATIONS = 16


def block_split(
  model: BlockTransformer,
  drafter: DraftHead,
  drafter_params,
  params,
  beam_width: int,
  max_new_tokens: int,
  tokens,
  pad,
  repeats: int,
) -> dict[str, float]:
  """Each standalone piece's ms at the loop's shapes for these prompts:
  draft, verify (over a local cache of the loop's size, committed length
  first + L_B // 2 - 1), block step and greedy token step per iteration of
  a jitted loop of PIECE_ITERATIONS (`_per_iteration_ms`), median over
  `repeats` calls after a compiling one; the prefill per call."""
  cfg: BlockConfig = model.config
  draft_len, block_len = drafter.config.draft_len, cfg.block_len
  first_len = _first_len(cfg)
  packed_len = beam_width * (draft_len + 1)
  local_len = first_len + block_len - 1 + packed_len
  batch, prompt_len = tokens.shape
  num_blocks = cfg.num_steps(max_new_tokens) + 1
  iterations = PIECE_ITERATIONS

  def call(p, method, *args):
    return model.apply({"params": p}, *args, method=method)

  decoder = BlockDecoder(model)
  prefill = jax.jit(lambda p, t, d: decoder.prefill(p, t, d, num_blocks))
  prefill_ms = _median_ms(prefill, (params, tokens, pad), repeats)
  state = prefill(params, tokens, pad)

  start = jax.jit(lambda p, c: call(p, _start_block, c, local_len))
  expanded, local, g0, hidden = start(params, state["context"])

  def draft(dp, p, h, g):
    return make_draft_fn(drafter, dp, p, SamplingConfig(), beam_width)(
      h, g, jnp.zeros_like(g), jnp.int32(0)
    )

  def draft_step(consts, h):
    dp, p, g = consts
    beams = draft(dp, p, h, g)
    return h + (beams[:, 0, -1] < 0).astype(h.dtype)[:, None]  # never true; a dependency

  draft_ms = _per_iteration_ms(
    draft_step, (drafter_params, params, g0), hidden, iterations, repeats
  )
  beams = jax.jit(draft)(drafter_params, params, hidden, g0).astype(jnp.int32)

  # The verify forward's inputs, made as the loop makes them (untimed).
  tree = batched_pack_beams(beams)
  length = jnp.full((batch,), first_len + block_len // 2 - 1, jnp.int32)
  local_slots = jnp.arange(local_len)
  context = local_slots[None, :] < length[:, None]
  relative = local_slots[None, :] - length[:, None]
  in_tree = (relative >= 0) & (relative < packed_len)
  visible = jnp.take_along_axis(
    tree.mask,
    jnp.broadcast_to(
      jnp.clip(relative, 0, packed_len - 1)[:, None, :], (batch, packed_len, local_len)
    ),
    axis=2,
  )
  mask = context[:, None, :] | (visible & in_tree[:, None, :])
  slots = length[:, None] + tree.depth

  def verify_step(consts, carry):
    p, ids, at, lengths, masks, exp = consts
    cache, total = carry
    logits, cache, _ = call(p, _tree_forward, ids, at, cache, lengths, masks, exp)
    return cache, total + logits[:, :, 0].sum()

  verify_ms = _per_iteration_ms(
    verify_step,
    (params, tree.tokens, slots, length, mask, expanded),
    (local, jnp.float32(0)),
    iterations,
    repeats,
  )

  def block_body(consts, carry):
    p, s, pb = consts
    blk, cache, total = carry
    exp, _, g, h, cache = call(p, _block_step, blk, cache, s, pb, local_len)
    return blk.at[:, 0].set(g), cache, total + h.sum() + exp[:, 0, 0].sum()

  block = jnp.zeros((batch, block_len), jnp.int32).at[:, 0].set(g0)
  slot = jnp.full((batch,), prompt_len // block_len, jnp.int32)
  block_step_ms = _per_iteration_ms(
    block_body,
    (params, slot, pad // block_len),
    (block, state["cache"], jnp.float32(0)),
    iterations,
    repeats,
  )

  greedy_local = caches_lib.init_stack_cache(
    cfg.token_stack, batch, cfg.token_decoder_len, cfg.compute_dtype
  )
  greedy_local = jax.tree.map(
    lambda fresh, first: fresh.at[:, :first_len].set(first[:, :first_len]), greedy_local, local
  )

  def token_body(consts, carry):
    p, exp = consts
    token, cache = carry
    return call(p, _greedy_token, token, jnp.int32(first_len), cache, exp)

  greedy_token_step_ms = _per_iteration_ms(
    token_body, (params, expanded), (g0, greedy_local), iterations, repeats
  )
  return dict(
    prefill_ms=prefill_ms,
    draft_ms=draft_ms,
    verify_ms=verify_ms,
    block_step_ms=block_step_ms,
    greedy_token_step_ms=greedy_token_step_ms,
  )


def finish_split(
  pieces: dict[str, float],
  *,
  spec_median_s: float,
  greedy_median_s: float,
  steps: int,
  records: dict[str, Any] | None,
  lengths: np.ndarray,
  block_len: int,
  max_new_tokens: int,
  repeats: int,
) -> dict[str, Any]:
  """The JSON split: the pieces, the loop's own step ((speculative median -
  prefill) / steps) and plain greedy decoding's per token, the per-step
  estimate of the pieces and the residual bookkeeping.

  Per loop step, drafting and verify run on the steps where some row drafts
  (`verify_steps_per_step`: from the step records when they are consistent,
  else 1) and the block step on the steps where some row completes a block
  (`block_steps_per_step`: at most 1; the blocks completed summed over
  rows / steps, an upper bound for batch > 1, exact for batch 1)."""
  steps = max(1, steps)
  loop_step = (1e3 * spec_median_s - pieces["prefill_ms"]) / steps
  greedy_step = (1e3 * greedy_median_s - pieces["prefill_ms"]) / max_new_tokens
  verify_steps = 1.0
  if records is not None and records["consistent"]:
    verified = (records["step_tree_tokens"] > 0).any(axis=0)
    verify_steps = float(verified.sum()) / steps
  block_steps = min(1.0, float((np.asarray(lengths) // block_len).sum()) / steps)
  per_step = verify_steps * (pieces["draft_ms"] + pieces["verify_ms"]) + (
    block_steps * pieces["block_step_ms"]
  )
  split = dict(
    pieces,
    method=SPLIT_METHOD,
    block_steps_per_step=block_steps,
    verify_steps_per_step=verify_steps,
    pieces_per_step_ms=per_step,
    loop_step_ms=loop_step,
    greedy_step_ms=greedy_step,
    bookkeeping_ms=loop_step - per_step,
    verify_over_greedy_token_step=pieces["verify_ms"] / pieces["greedy_token_step_ms"],
    piece_repeats=repeats,
    piece_iterations=PIECE_ITERATIONS,
  )
  return {key: split[key] for key in SPLIT_KEYS}
