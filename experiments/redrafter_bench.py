"""ReDrafter speculative decoding against plain greedy decoding, side by side.

    python -m experiments.redrafter_bench --workdir /tmp/qs_vanilla \
        [--draft_len 4] [--beam_width 4] [--train_steps 600] [--batch_sizes 1,4] \
        [--prompt_len 32] [--max_new_tokens 64] [--temperature 1.0] [--sample_beams 1,4] \
        --out /tmp/redrafter.json

1. Loads a trained vanilla run (`--workdir`: checkpoint and tokenizer); without
   one, a random-weight vanilla_tiny on a byte tokenizer (whose greedy text
   loops, so acceptance is not meaningful: use a trained run).
2. Distills a draft head (spec "Training"): windows of `--prompt_len` tokens
   from the corpus's train split, the base model's greedy continuations of
   `--max_new_tokens`, teacher forcing for `--train_steps` steps.
3. On prompts from the validation split, for each batch size: times greedy
   `generate` and `speculative_generate` (compiled, warm-up, repeats; the
   median), checks that both give the same tokens, and reports tokens/s,
   tokens per base-model step and the speedup.
4. Then speculative sampling (`--sample_beams` drafts sampled per step,
   recursive rejection sampling) against plain sampling at `--temperature`:
   tokens per step, tokens/s and the speedup (the outputs are random, equal
   in distribution, so only rates compare).

Prints a table and writes JSON (rewritten after every batch size, so a crash
keeps what was measured). CPU timings measure a compute-bound device
(the verify forward over the packed tree costs more there than on a GPU,
where a decode step is memory-bound): the published 2.7-2.8x is on H100s.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bt_jax import cli
from bt_jax.data import load_corpus
from bt_jax.inference import SamplingConfig, generate_fn, prepare_prompts
from bt_jax.models.vanilla import VanillaLM
from bt_jax.redrafter import corpus_windows, distill_drafter, drafter_generate_fn
from experiments.timing import time_call


def _load(workdir):
  if workdir:
    from bt_jax.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
    model, params, tokenizer = load_for_inference(workdir)
    if not isinstance(model, VanillaLM):
      raise ValueError(f"{workdir} holds a {model.config.kind} model; ReDrafter drafts for a "
                       "vanilla base model")
    return model, params, tokenizer, "trained"
  from bt_jax.config import VanillaConfig  # pylint: disable=import-outside-toplevel
  from bt_jax.models import build_model, init_params  # pylint: disable=import-outside-toplevel

  class Bytes:
    eos_id = 0

    def encode(self, text):
      return [1 + b for b in text.encode()]

  model = build_model(VanillaConfig(vocab_size=257, num_layers=4, width=128, max_len=256))
  return model, init_params(model, jax.random.key(0)), Bytes(), "random"


def _table(header: str, rows) -> None:
  print(header)
  print("-" * len(header))
  for row in rows:
    print(row)


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A trained vanilla run (default: random weights).", **fv)
  flags.DEFINE_integer("draft_len", 4, "Tokens the draft head proposes per beam.", **fv)
  flags.DEFINE_integer("beam_width", 4, "Beams for greedy speculative decoding.", **fv)
  flags.DEFINE_integer("train_steps", 600, "Drafter distillation steps.", **fv)
  flags.DEFINE_float("learning_rate", 3e-3, "Drafter learning rate.", **fv)
  flags.DEFINE_integer("distill_prompts", 256, "Prompts the base model continues to distill.",
                       **fv)
  flags.DEFINE_integer("train_batch", 32, "Drafter training batch.", **fv)
  flags.DEFINE_string("batch_sizes", "1,4", "Comma-separated decode batch sizes.", **fv)
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.", **fv)
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per row.", **fv)
  flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (the median is reported).",
                       **fv)
  flags.DEFINE_float("temperature", 1.0, "For the sampling comparison (with --sample_beams).",
                     **fv)
  flags.DEFINE_string("sample_beams", "1,4", "Drafts per step to time speculative sampling "
                      "with, against plain sampling at --temperature ('' to skip).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of prompts and training.", **fv)
  flags.DEFINE_string("out", None, "JSON output (its folder is created).", **fv)


def _int_list(flag: str, value: str) -> list[int]:
  try:
    return [int(x) for x in value.split(",") if x.strip()]
  except ValueError as e:
    raise cli.UserError(f"--{flag} {value!r} must be comma-separated integers, e.g. 1,4") from e


def main(flag_values: flags.FlagValues) -> Dict[str, Any]:
  args = flag_values
  settings = {name: args[name].value for name in (
      "draft_len", "beam_width", "train_steps", "learning_rate", "distill_prompts", "train_batch",
      "batch_sizes", "prompt_len", "max_new_tokens", "repeats", "temperature", "sample_beams",
      "seed")}
  batch_sizes = _int_list("batch_sizes", args.batch_sizes)
  rng = np.random.default_rng(args.seed)
  started = time.perf_counter()

  model, params, tokenizer, weights = _load(args.workdir)
  train_docs, valid_docs = load_corpus("stdlib", "train"), load_corpus("stdlib", "validation")
  t0 = time.perf_counter()
  drafter, result = distill_drafter(
      model, params, tokenizer, train_docs, draft_len=args.draft_len,
      num_prompts=args.distill_prompts, prompt_len=args.prompt_len,
      continuation_len=args.max_new_tokens, batch_size=args.train_batch,
      steps=args.train_steps, learning_rate=args.learning_rate, seed=args.seed)
  drafter_params, history = result.params, result.history
  train_seconds = time.perf_counter() - t0
  print(f"drafter: {args.train_steps} steps in {train_seconds:.0f} s, loss "
        f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, top-1 accuracy per draft "
        f"step {[round(a, 3) for a in history[-1]['acc_i']]}")

  sample_beams = _int_list("sample_beams", args.sample_beams)
  records, sampling_records = [], []
  device = jax.devices()[0]

  def report(complete: bool) -> Dict[str, Any]:
    value = dict(
        meta=dict(device=device.device_kind, backend=jax.default_backend(),
                  jax=jax.__version__, python=platform.python_version(), weights=weights,
                  workdir=args.workdir, seconds=time.perf_counter() - started,
                  train_seconds=train_seconds, complete=complete, **settings),
        drafter=dict(first_loss=history[0]["loss"], final_loss=history[-1]["loss"],
                     final_acc_i=history[-1]["acc_i"]),
        results=records, sampling=sampling_records)
    if args.out:
      cli.write_json_atomic(args.out, value, indent=1)
    return value

  for batch_size in batch_sizes:
    eval_prompts = corpus_windows(tokenizer, valid_docs, batch_size, args.prompt_len, rng)
    batch = prepare_prompts(eval_prompts, model.config, args.max_new_tokens)
    tokens, pad = jnp.asarray(batch.tokens), jnp.asarray(batch.pad)
    greedy = generate_fn(model, args.max_new_tokens)   # cached: one compile per shape
    greedy_args = (params, tokens, pad, jax.random.key(0))
    spec = drafter_generate_fn(model, drafter, args.beam_width, args.max_new_tokens)
    spec_args = (params, drafter_params, tokens, pad, jnp.int32(-1), jax.random.key(0))
    want, got = greedy(*greedy_args), spec(*spec_args)
    same = bool(np.array_equal(np.asarray(want.tokens), np.asarray(got.tokens)))
    greedy_time = time_call(greedy, greedy_args, warmup=1, repeats=args.repeats)
    spec_time = time_call(spec, spec_args, warmup=1, repeats=args.repeats)
    generated = int(np.asarray(got.lengths).sum())
    record = dict(
        batch_size=batch_size, same_tokens_as_greedy=same,
        tokens_per_step=generated / max(1, int(np.asarray(got.row_steps).sum())),
        base_steps=int(got.steps), greedy_steps=args.max_new_tokens,
        greedy_ms=greedy_time["median_ms"], speculative_ms=spec_time["median_ms"],
        greedy_tokens_per_s=generated / (greedy_time["median_ms"] * 1e-3),
        speculative_tokens_per_s=generated / (spec_time["median_ms"] * 1e-3))
    record["speedup"] = record["greedy_ms"] / record["speculative_ms"]
    records.append(record)
    if sample_beams:
      sampling = SamplingConfig(temperature=args.temperature)
      plain = generate_fn(model, args.max_new_tokens, sampling)
      plain_time = time_call(plain, greedy_args, warmup=1, repeats=args.repeats)
      plain_tokens = int(np.asarray(plain(*greedy_args).lengths).sum())
      for beams in sample_beams:
        sampled = drafter_generate_fn(model, drafter, beams, args.max_new_tokens, sampling)
        out = sampled(*spec_args)
        sampled_time = time_call(sampled, spec_args, warmup=1, repeats=args.repeats)
        made = int(np.asarray(out.lengths).sum())
        sample_record = dict(
            batch_size=batch_size, drafts=beams, temperature=args.temperature,
            tokens_per_step=made / max(1, int(np.asarray(out.row_steps).sum())),
            base_steps=int(out.steps), sampling_ms=plain_time["median_ms"],
            speculative_ms=sampled_time["median_ms"],
            sampling_tokens_per_s=plain_tokens / (plain_time["median_ms"] * 1e-3),
            speculative_tokens_per_s=made / (sampled_time["median_ms"] * 1e-3))
        sample_record["speedup"] = (sample_record["speculative_tokens_per_s"]
                                    / sample_record["sampling_tokens_per_s"])
        sampling_records.append(sample_record)
    report(complete=False)

  _table(f"{'batch':>5} {'same':>5} {'tok/step':>8} {'steps':>11} {'greedy ms':>10} "
         f"{'spec ms':>9} {'speedup':>8}",
         [f"{r['batch_size']:>5} {str(r['same_tokens_as_greedy']):>5} "
          f"{r['tokens_per_step']:>8.2f} {r['base_steps']:>4} vs {r['greedy_steps']:<4} "
          f"{r['greedy_ms']:>10.1f} {r['speculative_ms']:>9.1f} {r['speedup']:>7.2f}x"
          for r in records])
  if sampling_records:
    print(f"speculative sampling at temperature {args.temperature} against plain sampling "
          "(tokens/s: generated lengths differ by EOS)")
    _table(f"{'batch':>5} {'drafts':>6} {'tok/step':>8} {'steps':>5} {'plain ms':>9} "
           f"{'spec ms':>9} {'speedup':>8}",
           [f"{r['batch_size']:>5} {r['drafts']:>6} {r['tokens_per_step']:>8.2f} "
            f"{r['base_steps']:>5} {r['sampling_ms']:>9.1f} {r['speculative_ms']:>9.1f} "
            f"{r['speedup']:>7.2f}x" for r in sampling_records])
  final = report(complete=True)
  if args.out:
    print(f"wrote {args.out}")
  return final


if __name__ == "__main__":
  cli.run(main, define_flags)
