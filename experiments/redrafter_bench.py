"""ReDrafter speculative decoding against plain greedy decoding: a grid of
beam width x draft length x batch size, with where the time of a
speculative step goes.

    python -m experiments.redrafter_bench --workdir /tmp/qs_vanilla \
        [--drafter /tmp/qs_vanilla/drafter] [--beam_widths 1,2,4] [--draft_lens 2,4] \
        [--batch_sizes 1,4] [--prompt_len 32] [--max_new_tokens 64] [--repeats 5] \
        [--sample_beams 1,4] --out /tmp/redrafter.json --plot /tmp/redrafter.png

1. Loads a trained run (`--workdir`: checkpoint and tokenizer) of the kind
   `--base` names ("vanilla", or "block": a Block Transformer; a workdir of
   the other kind is refused); without one, a random-weight model on a byte
   tokenizer (vanilla 4 x 128; block `redrafter_bench_block.RANDOM_CONFIG`),
   whose greedy text loops, so acceptance is not meaningful: use a trained
   run. `--base block` is described in `experiments.redrafter_bench_block`
   and docs/redrafter.md; what follows is the vanilla base's.
2. Loads the draft head trained for it (`--drafter`, made by
   `python -m bt_jax.train_drafter`), or distills one here (docs/redrafter.md,
   "Use"): the base model's greedy continuations of `--max_new_tokens` after
   corpus windows of `--prompt_len` tokens, KL against its distributions, for
   `--train_steps` steps, drafting `--draft_len` tokens.
3. For each batch size, prompts from the validation split; for each beam
   width M and draft length C (at most the drafter's; a shorter C runs the
   same head for fewer steps), a point:
   - `same_tokens_as_greedy`: the speculative tokens against greedy `generate`;
   - `tokens_per_step` (generated tokens / base-model steps, per row) and
     `acceptance_by_depth[d - 1]`: the share of steps that accepted at least d
     drafts (d = 1..C; 1 + their sum is the mean tokens per step before
     EOS / max_new_tokens cuts);
   - `dedupe_removed`: the share of the M (C + 1) tree tokens that the prefix
     dedupe removed before the verify forward;
   - wall clock: `--warmup` untimed calls of each, then `--repeats` rounds of
     one greedy and one speculative call, interleaved (the order alternating)
     so that a change in the machine's load hits both; `greedy_ms` and
     `speculative_ms` as min / median / max, `speedup` the ratio of the
     medians and `speedup_per_repeat` min / median / max of each round's
     ratio;
   - `split`: one speculative step in parts, each the function the loop
     traces, jitted on its own and waited for (`block_until_ready`) between
     parts (`bt_jax.redrafter.speculative.greedy_step_parts`): drafting (the
     drafter's beam search), verify (the base model's forward over the packed
     tree) and bookkeeping (packing, dedupe and masks before the forward;
     acceptance, moving the chosen K/V, the output after it). A whole
     generation is stepped part by part (its tokens are checked against the
     loop's: `parts_same_tokens`) and every step's parts timed, `--split_repeats`
     times after one warm-up pass; each part's median over all those steps.
     `loop_step_ms` is the loop's own step ((speculative median - prefill) /
     steps), `greedy_step_ms` plain decoding's ((greedy median - prefill) /
     max_new_tokens); the parts run apart pay a dispatch each and lose
     fusion across parts, so their sum can exceed `loop_step_ms`
     (`parts_over_loop`).
4. Then, when `--sample_beams` is not empty, speculative sampling
   (that many drafts sampled per step, recursive rejection sampling) against
   plain sampling at `--temperature` with the drafter's full draft length and
   the first batch size: tokens per step, tokens/s and the speedup (the
   outputs are random, equal in distribution, so only rates compare).

Writes JSON after every point (a crash keeps what was measured), prints a
table, and with `--plot` draws the median speedup (min-max bars) against the
beam width, a line per draft length, a panel per batch size (matplotlib).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bt_jax import cli
from bt_jax.data import load_corpus
from bt_jax.inference import SamplingConfig, generate_fn, prepare_prompts
from bt_jax.redrafter import (
  DraftHead,
  corpus_windows,
  distill_drafter,
  drafter_cost,
  drafter_generate_fn,
  load_drafter,
)
from bt_jax.redrafter.block_speculative import block_drafter_generate_fn, check_block_drafter_fits
from bt_jax.redrafter.checkpoint import check_drafter_fits
from bt_jax.redrafter.speculative import greedy_step_parts
from experiments import redrafter_bench_block
from experiments.timing import time_call

# The kinds of base model the benchmark drafts for ("block": a Block
# Transformer base, `experiments.redrafter_bench_block`).
BASES = ("vanilla", "block")

# Keys of one grid point in the JSON (tests check the schema).
POINT_KEYS = (
  "base",
  "batch_size",
  "beam_width",
  "draft_len",
  "same_tokens_as_greedy",
  "tokens_per_step",
  "mean_accepted",
  "acceptance_by_depth",
  "dedupe_removed",
  "tree_tokens_per_step",
  "base_steps",
  "greedy_steps",
  "generated_tokens",
  "greedy_ms",
  "speculative_ms",
  "speedup",
  "speedup_per_repeat",
  "greedy_tokens_per_s",
  "speculative_tokens_per_s",
  "per_step_source",
  "split",
)
SPLIT_KEYS = (
  "method",
  "prefill_ms",
  "draft_ms",
  "verify_ms",
  "bookkeeping_ms",
  "tree_ms",
  "commit_ms",
  "parts_ms",
  "shares",
  "loop_step_ms",
  "greedy_step_ms",
  "parts_over_loop",
  "verify_over_greedy_step",
  "parts_same_tokens",
  "timed_steps",
)
SPLIT_METHOD = (
  "each part the function the loop traces, jitted apart, block_until_ready after "
  "each; per-step times over whole generations, median"
)


class _Bytes:
  """The random fallback's tokenizer: bytes + 1 (0 is EOS)."""

  eos_id = 0

  def encode(self, text):
    return [1 + b for b in text.encode()]


def _load(workdir, base: str = "vanilla"):
  """(model, params, tokenizer, "trained" / "random") of --base's kind; a
  workdir of another kind is refused (read from its model config, before
  any weights)."""
  if workdir:
    # pylint: disable-next=import-outside-toplevel
    from bt_jax.checkpointing import load_for_inference, load_model_config

    kind = load_model_config(workdir).kind
    if kind != base:
      raise cli.UserError(
        f"{workdir} holds a {kind} model; --base {base} drafts for a {base} base model "
        f"(use --base {kind})"
      )
    model, params, tokenizer = load_for_inference(workdir)
    return model, params, tokenizer, "trained"
  if base == "block":
    model, params = redrafter_bench_block.random_block_model()
    return model, params, _Bytes(), "random"
  from bt_jax.config import VanillaConfig  # pylint: disable=import-outside-toplevel
  from bt_jax.models import build_model, init_params  # pylint: disable=import-outside-toplevel

  model = build_model(VanillaConfig(vocab_size=257, num_layers=4, width=128, max_len=256))
  return model, init_params(model, jax.random.key(0)), _Bytes(), "random"


def _check_base(base: str) -> None:
  if base not in BASES:
    raise cli.UserError(f"--base {base!r} must be one of {BASES}")


def _table(header: str, rows) -> None:
  print(header)
  print("-" * len(header))
  for row in rows:
    print(row)


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string(
    "workdir", None, "A trained run of --base's kind (default: random weights).", **fv
  )
  flags.DEFINE_string("base", "vanilla", f"The kind of base model: one of {BASES}.", **fv)
  flags.DEFINE_string(
    "drafter",
    None,
    "A drafter trained for --workdir (python -m bt_jax.train_drafter); default: distill one here.",
    **fv,
  )
  flags.DEFINE_bool(
    "cross_blocks",
    True,
    "With --base block: drafts may cross the block boundary (--nocross_blocks: within "
    "the current block only). The split has no piece for the candidate blocks' forward "
    "(it lands in bookkeeping).",
    **fv,
  )
  flags.DEFINE_integer("draft_len", 4, "Tokens the drafter distilled here learns to draft.", **fv)
  flags.DEFINE_string("beam_widths", "1,2,4", "Comma-separated beam widths M.", **fv)
  flags.DEFINE_string(
    "draft_lens",
    "",
    "Comma-separated draft lengths C, each at most the drafter's (default: the drafter's).",
    **fv,
  )
  flags.DEFINE_string("batch_sizes", "1,4", "Comma-separated decode batch sizes.", **fv)
  flags.DEFINE_integer("train_steps", 600, "Drafter distillation steps (without --drafter).", **fv)
  flags.DEFINE_float("learning_rate", 3e-3, "Drafter learning rate.", **fv)
  flags.DEFINE_integer("distill_prompts", 256, "Prompts the base model continues to distill.", **fv)
  flags.DEFINE_integer("train_batch", 32, "Drafter training batch.", **fv)
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.", **fv)
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per row.", **fv)
  flags.DEFINE_integer("warmup", 1, "Untimed calls of each decoder before the repeats.", **fv)
  flags.DEFINE_integer(
    "repeats", 5, "Interleaved timed rounds (greedy, speculative) per point.", **fv
  )
  flags.DEFINE_integer(
    "split_repeats",
    2,
    "Generations stepped part by part for the time split (after one warm-up generation).",
    **fv,
  )
  flags.DEFINE_float("temperature", 1.0, "For the sampling comparison (with --sample_beams).", **fv)
  flags.DEFINE_string(
    "sample_beams",
    "",
    "Drafts per step to time speculative sampling "
    "with, against plain sampling at --temperature ('': skip).",
    **fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of prompts and training.", **fv)
  flags.DEFINE_string("out", None, "JSON output (its folder is created).", **fv)
  flags.DEFINE_string("plot", None, "PNG of speedup against beam width and draft length.", **fv)


def _int_list(flag: str, value: str, minimum: int = 1) -> list[int]:
  try:
    values = [int(x) for x in value.split(",") if x.strip()]
  except ValueError as e:
    raise cli.UserError(f"--{flag} {value!r} must be comma-separated integers, e.g. 1,4") from e
  bad = [v for v in values if v < minimum]
  if bad:
    raise cli.UserError(f"--{flag} {value!r}: every value must be at least {minimum}; got {bad}")
  return values


def _spread(values) -> Dict[str, float]:
  return dict(
    min=float(min(values)), median=float(statistics.median(values)), max=float(max(values))
  )


def _wait(value):
  return jax.block_until_ready(value)


def interleaved_times(
  fns: Dict[str, Any], args: Dict[str, tuple], warmup: int, repeats: int
) -> Dict[str, list]:
  """Seconds of each call of fns[name](*args[name]) over `repeats` rounds,
  one call of each per round, the order rotating each round, after
  `warmup` untimed rounds; each call waited for."""
  if repeats < 1:
    raise cli.UserError(f"--repeats must be at least 1; got {repeats}")
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      _wait(fns[name](*args[name]))
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      _wait(fns[name](*args[name]))
      times[name].append(time.perf_counter() - start)
  return times


def time_split(
  parts, params, drafter_params, tokens, pad, repeats: int, reference: Optional[np.ndarray] = None
) -> Dict[str, Any]:
  """One speculative step in parts (`GreedyStepParts`): a generation stepped
  part by part, each part waited for and timed, `repeats` times after an
  untimed pass (compilation). Returns the medians over all steps in ms:
  draft, verify, tree (before the forward) and commit (after it), their
  bookkeeping sum, the parts' sum and shares of it, the prefill; and
  whether the stepped tokens equal `reference` (the loop's)."""
  per_part = {name: [] for name in ("draft", "tree", "verify", "commit")}
  prefill_times, tokens_out, steps = [], None, 0
  for rep in range(repeats + 1):
    start = time.perf_counter()
    state = _wait(parts.prefill(params, tokens, pad))
    prefill_s = time.perf_counter() - start
    laps = {name: [] for name in per_part}
    while (
      not bool(np.all(np.asarray(state["done"])))
      and int(state["step"]) < (state["step_accepted"].shape[1])
    ):
      start = time.perf_counter()
      beams = _wait(parts.draft(drafter_params, params, state))
      t1 = time.perf_counter()
      tree, mask, positions = _wait(parts.tree(state, beams, pad))
      t2 = time.perf_counter()
      logits, cache, hidden = _wait(parts.verify(params, state, tree, mask, positions, pad))
      t3 = time.perf_counter()
      state = _wait(parts.commit(state, beams, tree, logits, cache, hidden))
      t4 = time.perf_counter()
      for name, seconds in zip(per_part, (t1 - start, t2 - t1, t3 - t2, t4 - t3)):
        laps[name].append(seconds)
    if rep == 0:  # the warm-up pass: compilation
      tokens_out = np.asarray(parts.output(state).tokens)
      continue
    prefill_times.append(prefill_s)
    steps += len(laps["draft"])
    for name in per_part:
      per_part[name].extend(laps[name])
  ms = {name: 1e3 * statistics.median(v) for name, v in per_part.items()}
  bookkeeping = ms["tree"] + ms["commit"]
  total = ms["draft"] + ms["verify"] + bookkeeping
  return dict(
    method=SPLIT_METHOD,
    prefill_ms=1e3 * statistics.median(prefill_times),
    draft_ms=ms["draft"],
    verify_ms=ms["verify"],
    bookkeeping_ms=bookkeeping,
    tree_ms=ms["tree"],
    commit_ms=ms["commit"],
    parts_ms=total,
    shares=dict(
      draft=ms["draft"] / total, verify=ms["verify"] / total, bookkeeping=bookkeeping / total
    ),
    parts_same_tokens=None if reference is None else bool(np.array_equal(tokens_out, reference)),
    timed_steps=steps,
  )


def acceptance_stats(
  step_accepted: np.ndarray, step_tree_tokens: np.ndarray, beam_width: int, draft_len: int
) -> Dict[str, Any]:
  """From a loop's per-step records ([B, max_new], -1 / 0 where a row had
  finished): the share of row-steps accepting at least d drafts (d =
  1..C), the mean accepted, the tree tokens verified per row-step and the
  share of the M (C + 1) the dedupe removed."""
  active = step_accepted >= 0
  count = max(1, int(active.sum()))
  accepted = step_accepted[active]
  tree_tokens = float(step_tree_tokens[active].sum()) / count
  return dict(
    acceptance_by_depth=[float((accepted >= d).sum()) / count for d in range(1, draft_len + 1)],
    mean_accepted=float(accepted.sum()) / count,
    tree_tokens_per_step=tree_tokens,
    dedupe_removed=1.0 - tree_tokens / (beam_width * (draft_len + 1)),
  )


def _with_draft_len(drafter: DraftHead, draft_len: int) -> DraftHead:
  trained = drafter.config.draft_len
  if draft_len > trained:
    raise cli.UserError(
      f"--draft_lens {draft_len} exceeds the drafter's draft_len {trained} "
      f"(what it was trained to draft); use values in [1, {trained}]"
    )
  if draft_len == trained:
    return drafter
  return DraftHead(dataclasses.replace(drafter.config, draft_len=draft_len))


def plot_speedup(points: List[Dict[str, Any]], path: str) -> None:
  """Median speedup (min-max bars over the repeats' ratios) against beam
  width, a line per draft length, a panel per batch size."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  batch_sizes = sorted({p["batch_size"] for p in points})
  fig, axes = plt.subplots(
    1, len(batch_sizes), figsize=(3.2 * len(batch_sizes) + 0.6, 2.8), squeeze=False, sharey=True
  )
  for ax, batch_size in zip(axes[0], batch_sizes):
    for draft_len in sorted({p["draft_len"] for p in points}):
      line = sorted(
        (p for p in points if p["batch_size"] == batch_size and p["draft_len"] == draft_len),
        key=lambda p: p["beam_width"],
      )
      if not line:
        continue
      x = [p["beam_width"] for p in line]
      med = [p["speedup_per_repeat"]["median"] for p in line]
      low = [m - p["speedup_per_repeat"]["min"] for m, p in zip(med, line)]
      high = [p["speedup_per_repeat"]["max"] - m for m, p in zip(med, line)]
      ax.errorbar(x, med, yerr=[low, high], marker="o", capsize=3, label=f"C = {draft_len}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    bases = sorted({p.get("base", "vanilla") for p in points})
    ax.set_title(f"{', '.join(bases)} base, batch {batch_size}", fontsize=9)
    ax.set_xlabel("beam width M", fontsize=8)
    ax.set_xticks(sorted({p["beam_width"] for p in points}))
    ax.tick_params(labelsize=7)
  axes[0][0].set_ylabel("speedup over greedy", fontsize=8)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(cli.make_parent_dirs(path), dpi=90)
  plt.close(fig)


def main(flag_values: flags.FlagValues) -> Dict[str, Any]:
  args = flag_values
  _check_base(args.base)
  settings = {
    name: args[name].value
    for name in (
      "base",
      "cross_blocks",
      "drafter",
      "draft_len",
      "beam_widths",
      "draft_lens",
      "batch_sizes",
      "train_steps",
      "learning_rate",
      "distill_prompts",
      "train_batch",
      "prompt_len",
      "max_new_tokens",
      "warmup",
      "repeats",
      "split_repeats",
      "temperature",
      "sample_beams",
      "seed",
    )
  }
  batch_sizes = _int_list("batch_sizes", args.batch_sizes)
  beam_widths = _int_list("beam_widths", args.beam_widths)
  sample_beams = _int_list("sample_beams", args.sample_beams)
  if sample_beams and args.base == "block":
    raise cli.UserError("--sample_beams times speculative sampling for --base vanilla only")
  for flag in ("repeats", "split_repeats", "prompt_len", "max_new_tokens"):
    if args[flag].value < 1:
      raise cli.UserError(f"--{flag} must be at least 1; got {args[flag].value}")
  if args.warmup < 0:
    raise cli.UserError(f"--warmup must be at least 0; got {args.warmup}")
  rng = np.random.default_rng(args.seed)
  started = time.perf_counter()

  block = args.base == "block"
  model, params, tokenizer, weights = _load(args.workdir, args.base)
  train_docs, valid_docs = load_corpus("stdlib", "train"), load_corpus("stdlib", "validation")
  t0 = time.perf_counter()
  if args.drafter:
    drafter, drafter_params, metadata = load_drafter(args.drafter)
    if block:
      try:
        check_block_drafter_fits(drafter, model.config, metadata.get("base_model"))
      except ValueError as e:
        raise cli.UserError(f"--drafter {args.drafter}: {e}") from e
    else:
      check_drafter_fits(drafter, model.config)
    drafter_info = dict(source=args.drafter)
  elif block:
    drafter, drafter_params, losses = redrafter_bench_block.distill_block_drafter(
      model,
      params,
      tokenizer,
      train_docs,
      draft_len=args.draft_len,
      num_prompts=args.distill_prompts,
      prompt_len=args.prompt_len,
      continuation_len=args.max_new_tokens,
      batch_size=args.train_batch,
      steps=args.train_steps,
      learning_rate=args.learning_rate,
      seed=args.seed,
    )
    drafter_info = dict(
      source="trained here (hard labels on the base model's greedy continuations)",
      first_loss=losses[0],
      final_loss=losses[-1],
    )
    print(
      f"drafter: {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, loss "
      f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    )
  else:
    drafter, result = distill_drafter(
      model,
      params,
      tokenizer,
      train_docs,
      draft_len=args.draft_len,
      num_prompts=args.distill_prompts,
      prompt_len=args.prompt_len,
      continuation_len=args.max_new_tokens,
      batch_size=args.train_batch,
      steps=args.train_steps,
      learning_rate=args.learning_rate,
      seed=args.seed,
    )
    drafter_params, history = result.params, result.history
    drafter_info = dict(
      source="distilled here",
      first_loss=history[0]["loss"],
      final_loss=history[-1]["loss"],
      final_acc_i=history[-1]["acc_i"],
    )
    print(
      f"drafter: {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, loss "
      f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, top-1 accuracy per draft "
      f"step {[round(a, 3) for a in history[-1]['acc_i']]}"
    )
  train_seconds = time.perf_counter() - t0
  draft_lens = _int_list("draft_lens", args.draft_lens) or [drafter.config.draft_len]
  drafters = {c: _with_draft_len(drafter, c) for c in draft_lens}
  for m in beam_widths:
    if m > model.config.vocab_size:
      raise cli.UserError(f"--beam_widths {m} exceeds the vocabulary ({model.config.vocab_size})")
  base_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if block:  # drafter_cost's FLOPs model is a vanilla stack's
    from bt_jax.model_summary import param_counts  # pylint: disable=import-outside-toplevel

    drafter_info.update(
      config=dataclasses.asdict(drafter.config),
      params_fraction=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(drafter_params))
      / base_params,
      draft_token_flops_fraction=None,
    )
    non_embedding = param_counts(model.config)["non_embedding_params"]
  else:
    cost = drafter_cost(
      drafter.config,
      model.config,
      beam_width=max(beam_widths),
      context_len=args.prompt_len + args.max_new_tokens // 2,
    )
    drafter_info.update(
      config=dataclasses.asdict(drafter.config),
      params_fraction=cost["params_fraction"],
      draft_token_flops_fraction=cost["draft_token_fraction"],
    )
    embed = int(np.prod(params["token_embed"]["embedding"].shape))
    head = int(np.prod(params["lm_head"]["kernel"].shape)) if "lm_head" in params else 0
    non_embedding = base_params - embed - head

  records, sampling_records = [], []
  device = jax.devices()[0]

  def report(complete: bool) -> Dict[str, Any]:
    value = dict(
      meta=dict(
        device=device.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        python=platform.python_version(),
        weights=weights,
        workdir=args.workdir,
        seconds=time.perf_counter() - started,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        train_seconds=train_seconds,
        complete=complete,
        base_params=base_params,
        base_non_embedding_params=non_embedding,
        **settings,
      ),
      drafter=drafter_info,
      results=records,
      sampling=sampling_records,
    )
    if args.out:
      cli.write_json_atomic(args.out, value, indent=1)
    return value

  max_new = args.max_new_tokens
  for batch_size in batch_sizes:
    eval_prompts = corpus_windows(tokenizer, valid_docs, batch_size, args.prompt_len, rng)
    batch = prepare_prompts(eval_prompts, model.config, max_new)
    tokens, pad = jnp.asarray(batch.tokens), jnp.asarray(batch.pad)
    greedy = generate_fn(model, max_new)  # cached: one compile per shape
    greedy_args = (params, tokens, pad, jax.random.key(0))
    want = np.asarray(greedy(*greedy_args).tokens)
    reference = None
    if block:  # greedy past max_new: what the last steps' drafts are checked against
      extra = generate_fn(model, max_new + max(draft_lens))(*greedy_args)
      reference = np.asarray(extra.tokens)
      if not np.array_equal(reference[:, :max_new], want):
        reference = None
    for draft_len in draft_lens:
      for beam_width in beam_widths:
        if block:
          records.append(
            _block_point(
              args,
              model,
              params,
              drafters[draft_len],
              drafter_params,
              beam_width,
              tokens,
              pad,
              greedy,
              greedy_args,
              want,
              reference,
            )
          )
          print(_row(records[-1]), flush=True)
          report(complete=False)
          continue
        spec = drafter_generate_fn(model, drafters[draft_len], beam_width, max_new)
        spec_args = (params, drafter_params, tokens, pad, jnp.int32(-1), jax.random.key(0))
        got = spec(*spec_args)
        got_tokens = np.asarray(got.tokens)
        times = interleaved_times(
          {"greedy": greedy, "speculative": spec},
          {"greedy": greedy_args, "speculative": spec_args},
          args.warmup,
          args.repeats,
        )
        parts = greedy_step_parts(model, drafters[draft_len], beam_width, max_new, tokens.shape[1])
        split = time_split(
          parts, params, drafter_params, tokens, pad, args.split_repeats, reference=got_tokens
        )
        greedy_med = statistics.median(times["greedy"])
        spec_med = statistics.median(times["speculative"])
        steps = int(got.steps)
        split.update(
          loop_step_ms=(1e3 * spec_med - split["prefill_ms"]) / max(1, steps),
          greedy_step_ms=(1e3 * greedy_med - split["prefill_ms"]) / max_new,
        )
        split["parts_over_loop"] = split["parts_ms"] / split["loop_step_ms"]
        split["verify_over_greedy_step"] = split["verify_ms"] / split["greedy_step_ms"]
        split = {key: split[key] for key in SPLIT_KEYS}
        generated = int(np.asarray(got.lengths).sum())
        record = dict(
          base=args.base,
          batch_size=batch_size,
          beam_width=beam_width,
          draft_len=draft_len,
          same_tokens_as_greedy=bool(np.array_equal(want, got_tokens)),
          tokens_per_step=generated / max(1, int(np.asarray(got.row_steps).sum())),
          **acceptance_stats(
            np.asarray(got.step_accepted), np.asarray(got.step_tree_tokens), beam_width, draft_len
          ),
          base_steps=steps,
          greedy_steps=max_new,
          generated_tokens=generated,
          greedy_ms=_spread([1e3 * t for t in times["greedy"]]),
          speculative_ms=_spread([1e3 * t for t in times["speculative"]]),
          speedup=greedy_med / spec_med,
          speedup_per_repeat=_spread(
            [g / s for g, s in zip(times["greedy"], times["speculative"])]
          ),
          greedy_tokens_per_s=generated / greedy_med,
          speculative_tokens_per_s=generated / spec_med,
          per_step_source="the loop's SpeculativeOutput.step_accepted / step_tree_tokens",
          split=split,
        )
        records.append({key: record[key] for key in POINT_KEYS})
        print(_row(records[-1]), flush=True)
        report(complete=False)

  if sample_beams:
    batch_size = batch_sizes[0]
    eval_prompts = corpus_windows(tokenizer, valid_docs, batch_size, args.prompt_len, rng)
    batch = prepare_prompts(eval_prompts, model.config, max_new)
    tokens, pad = jnp.asarray(batch.tokens), jnp.asarray(batch.pad)
    plain_args = (params, tokens, pad, jax.random.key(0))
    spec_args = (params, drafter_params, tokens, pad, jnp.int32(-1), jax.random.key(0))
    sampling = SamplingConfig(temperature=args.temperature)
    plain = generate_fn(model, max_new, sampling)
    plain_time = time_call(plain, plain_args, warmup=args.warmup, repeats=args.repeats)
    plain_tokens = int(np.asarray(plain(*plain_args).lengths).sum())
    for beams in sample_beams:
      sampled = drafter_generate_fn(model, drafter, beams, max_new, sampling)
      out = sampled(*spec_args)
      sampled_time = time_call(sampled, spec_args, warmup=args.warmup, repeats=args.repeats)
      made = int(np.asarray(out.lengths).sum())
      sample_record = dict(
        batch_size=batch_size,
        drafts=beams,
        temperature=args.temperature,
        tokens_per_step=made / max(1, int(np.asarray(out.row_steps).sum())),
        base_steps=int(out.steps),
        sampling_ms=plain_time["median_ms"],
        speculative_ms=sampled_time["median_ms"],
        sampling_tokens_per_s=plain_tokens / (plain_time["median_ms"] * 1e-3),
        speculative_tokens_per_s=made / (sampled_time["median_ms"] * 1e-3),
      )
      sample_record["speedup"] = (
        sample_record["speculative_tokens_per_s"] / sample_record["sampling_tokens_per_s"]
      )
      sampling_records.append(sample_record)
      report(complete=False)

  print()
  _table(HEADER, [_row(r) for r in records])
  if block:
    print(f"split ms per step: {redrafter_bench_block.SPLIT_METHOD}")
    _table(BLOCK_SPLIT_HEADER, [_block_split_row(r) for r in records])
  else:
    print(f"split ms per step: parts jitted apart ({SPLIT_METHOD}); loop = the loop's own step")
    _table(SPLIT_HEADER, [_split_row(r) for r in records])
  if sampling_records:
    print(
      f"speculative sampling at temperature {args.temperature} against plain sampling "
      "(tokens/s: generated lengths differ by EOS)"
    )
    _table(
      f"{'batch':>5} {'drafts':>6} {'tok/step':>8} {'steps':>5} {'plain ms':>9} "
      f"{'spec ms':>9} {'speedup':>8}",
      [
        f"{r['batch_size']:>5} {r['drafts']:>6} {r['tokens_per_step']:>8.2f} "
        f"{r['base_steps']:>5} {r['sampling_ms']:>9.1f} {r['speculative_ms']:>9.1f} "
        f"{r['speedup']:>7.2f}x"
        for r in sampling_records
      ],
    )
  final = report(complete=True)
  if args.plot and records:
    plot_speedup(records, args.plot)
    print(f"wrote {args.plot}")
  if args.out:
    print(f"wrote {args.out}")
  return final


HEADER = (
  f"{'B':>2} {'M':>2} {'C':>2} {'same':>5} {'tok/step':>8} {'accepted >= d':<24} "
  f"{'dedupe':>6} {'greedy ms':>9} {'spec ms':>8} {'speedup (min/med/max)':>22}"
)
SPLIT_HEADER = (
  f"{'B':>2} {'M':>2} {'C':>2} {'draft':>7} {'verify':>7} {'bookkeep':>8} "
  f"{'parts':>7} {'loop':>7} {'greedy':>7} {'verify/greedy':>13} {'parts ok':>8}"
)


def _row(r: Dict[str, Any]) -> str:
  depth = "n/a"
  if r["acceptance_by_depth"] is not None:
    depth = " ".join(f"{a:.2f}" for a in r["acceptance_by_depth"])
  dedupe = "  n/a" if r["dedupe_removed"] is None else f"{100 * r['dedupe_removed']:>5.0f}%"
  s = r["speedup_per_repeat"]
  return (
    f"{r['batch_size']:>2} {r['beam_width']:>2} {r['draft_len']:>2} "
    f"{str(r['same_tokens_as_greedy']):>5} {r['tokens_per_step']:>8.2f} {depth:<24} "
    f"{dedupe:>6} {r['greedy_ms']['median']:>9.1f} "
    f"{r['speculative_ms']['median']:>8.1f} "
    f"{s['min']:>6.2f} / {s['median']:.2f} / {s['max']:.2f}x"
  )


def _split_row(r: Dict[str, Any]) -> str:
  s = r["split"]
  return (
    f"{r['batch_size']:>2} {r['beam_width']:>2} {r['draft_len']:>2} {s['draft_ms']:>7.2f} "
    f"{s['verify_ms']:>7.2f} {s['bookkeeping_ms']:>8.2f} {s['parts_ms']:>7.2f} "
    f"{s['loop_step_ms']:>7.2f} {s['greedy_step_ms']:>7.2f} "
    f"{s['verify_over_greedy_step']:>13.2f} {str(s['parts_same_tokens']):>8}"
  )


BLOCK_SPLIT_HEADER = (
  f"{'B':>2} {'M':>2} {'C':>2} {'draft':>7} {'verify':>7} {'block':>7} {'blk/step':>8} "
  f"{'pieces':>7} {'loop':>7} {'bookkeep':>8} {'greedy tok':>10} {'verify/tok':>10}"
)


def _block_split_row(r: Dict[str, Any]) -> str:
  s = r["split"]
  return (
    f"{r['batch_size']:>2} {r['beam_width']:>2} {r['draft_len']:>2} {s['draft_ms']:>7.2f} "
    f"{s['verify_ms']:>7.2f} {s['block_step_ms']:>7.2f} {s['block_steps_per_step']:>8.2f} "
    f"{s['pieces_per_step_ms']:>7.2f} {s['loop_step_ms']:>7.2f} {s['bookkeeping_ms']:>8.2f} "
    f"{s['greedy_token_step_ms']:>10.2f} {s['verify_over_greedy_token_step']:>10.2f}"
  )


def _block_point(
  args,
  model,
  params,
  drafter: DraftHead,
  drafter_params,
  beam_width: int,
  tokens,
  pad,
  greedy,
  greedy_args,
  want: np.ndarray,
  reference: Optional[np.ndarray],
) -> Dict[str, Any]:
  """One grid point over a Block Transformer base (`redrafter_bench_block`):
  the loop through `block_drafter_generate_fn`, per-step records from an
  instrumented rerun, standalone pieces for the split."""
  max_new, draft_len = args.max_new_tokens, drafter.config.draft_len
  spec = block_drafter_generate_fn(
    model, drafter, beam_width, max_new, cross_blocks=args.cross_blocks
  )
  spec_args = (params, drafter_params, tokens, pad, jnp.int32(-1), jax.random.key(0))
  got = spec(*spec_args)
  got_tokens = np.asarray(got.tokens)
  times = interleaved_times(
    {"greedy": greedy, "speculative": spec},
    {"greedy": greedy_args, "speculative": spec_args},
    args.warmup,
    args.repeats,
  )
  recs, source = None, "no greedy reference past max_new_tokens (it differed from greedy)"
  if reference is not None:
    recs = redrafter_bench_block.step_records(
      model,
      drafter,
      drafter_params,
      params,
      beam_width,
      max_new,
      tokens,
      pad,
      got,
      reference,
      cross_blocks=args.cross_blocks,
    )
    source = (
      "derived from an instrumented rerun of the block loop (each step's beams against "
      "greedy's tokens), consistent with the loop's accepted / row_steps totals"
    )
    if not recs["consistent"]:
      source, recs = redrafter_bench_block.NO_RECORDS, None
  if recs is not None:
    stats = redrafter_bench_block.block_acceptance_stats(
      recs["step_accepted"], recs["step_tree_tokens"], beam_width, draft_len
    )
  else:  # only what the loop's totals give
    row_steps = max(1, int(np.asarray(got.row_steps).sum()))
    stats = dict(
      acceptance_by_depth=None,
      mean_accepted=float(np.asarray(got.accepted).sum()) / row_steps,
      tree_tokens_per_step=None,
      dedupe_removed=None,
    )
  pieces = redrafter_bench_block.block_split(
    model,
    drafter,
    drafter_params,
    params,
    beam_width,
    max_new,
    tokens,
    pad,
    repeats=max(5, args.repeats),
  )
  greedy_med = statistics.median(times["greedy"])
  spec_med = statistics.median(times["speculative"])
  steps = int(got.steps)
  split = redrafter_bench_block.finish_split(
    pieces,
    spec_median_s=spec_med,
    greedy_median_s=greedy_med,
    steps=steps,
    records=recs,
    lengths=np.asarray(got.lengths),
    block_len=model.config.block_len,
    max_new_tokens=max_new,
    repeats=max(5, args.repeats),
  )
  generated = int(np.asarray(got.lengths).sum())
  record = dict(
    base="block",
    batch_size=int(tokens.shape[0]),
    beam_width=beam_width,
    draft_len=draft_len,
    same_tokens_as_greedy=bool(np.array_equal(want, got_tokens)),
    tokens_per_step=generated / max(1, int(np.asarray(got.row_steps).sum())),
    **stats,
    base_steps=steps,
    greedy_steps=max_new,
    generated_tokens=generated,
    greedy_ms=_spread([1e3 * t for t in times["greedy"]]),
    speculative_ms=_spread([1e3 * t for t in times["speculative"]]),
    speedup=greedy_med / spec_med,
    speedup_per_repeat=_spread([g / s for g, s in zip(times["greedy"], times["speculative"])]),
    greedy_tokens_per_s=generated / greedy_med,
    speculative_tokens_per_s=generated / spec_med,
    per_step_source=source,
    split=split,
  )
  return {key: record[key] for key in POINT_KEYS}


if __name__ == "__main__":
  cli.run(main, define_flags)
