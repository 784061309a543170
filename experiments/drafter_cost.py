"""What a ReDrafter draft head costs against its base model, per variant:
parameters and FLOPs (`bt_jax.redrafter.drafter.drafter_cost`) and CPU/GPU
wall time of one speculative step's drafting (beam search, M beams of C
tokens) against the base model's verify forward over the M (C + 1) packed
tokens and against one plain decode step. Random weights (timing only);
each time is the minimum over --repeats calls (on a shared CPU the median
measures the neighbours).

    python -m experiments.drafter_cost [--width 128 --layers 4 --vocab 2048] \
        [--batch_sizes 1,8] [--out /tmp/drafter_cost.json]

--out (its folders are created) is rewritten after every measurement.

The defaults are the quickstart vanilla model (gin_configs/runs/quickstart_vanilla.gin).
"""

from __future__ import annotations


import jax
from absl import flags
import jax.numpy as jnp

from bt_jax import cli
from bt_jax.config import VanillaConfig
from bt_jax.models import build_model, init_params
from bt_jax.redrafter.drafter import (
  DrafterConfig,
  DraftHead,
  base_head_of,
  drafter_cost,
  init_drafter,
)
from bt_jax.redrafter.tree import beam_search
from experiments.timing import time_call

# name -> DrafterConfig.for_base arguments
VARIANTS = {
  "paper (own 2H x V head, ResBlocks 2H)": dict(lm_head="own", exit_ratio=1.0),
  "base head, ResBlocks 2H": dict(lm_head="base", exit_ratio=1.0),
  "base head, ResBlocks H (default)": dict(lm_head="base", exit_ratio=0.5),
  "base head, ResBlocks H/2": dict(lm_head="base", exit_ratio=0.25),
  "base head, ResBlocks H, sum (rnn=False)": dict(lm_head="base", recurrence="sum"),
}


def _timings(model, params, drafter, dparams, batch, beam_width, context, repeats):
  cfg = model.config
  draft_len = drafter.config.draft_len
  packed = beam_width * (draft_len + 1)
  cache_len = context + packed
  key = jax.random.key(1)
  hidden = jax.random.normal(key, (batch, cfg.width))
  g0 = jnp.arange(batch, dtype=jnp.int32) % cfg.vocab_size
  table, head = params["token_embed"]["embedding"], base_head_of(drafter, params)

  @jax.jit
  def draft(dparams, hidden, g0):
    return beam_search(
      drafter,
      dparams,
      hidden,
      g0,
      table,
      beam_width=beam_width,
      draft_len=draft_len,
      base_head=head,
    )[0]

  from bt_jax.inference.decoding import VanillaDecoder  # pylint: disable=import-outside-toplevel

  decoder = VanillaDecoder(model)
  prompt = jnp.ones((batch, context), jnp.int32)
  carry = decoder.prefill(params, prompt, jnp.zeros((batch,), jnp.int32), packed)
  cache = carry["cache"]
  slots = jnp.arange(cache_len)

  def forward(params, cache, tokens):
    queries = tokens.shape[1]
    mask = jnp.broadcast_to(
      slots[None, None, :] < context + 1 + jnp.arange(queries)[None, :, None],
      (batch, queries, cache_len),
    )
    positions = jnp.broadcast_to(context + jnp.arange(queries)[None], (batch, queries))
    return decoder.apply_decode(params, tokens, positions, cache, context, mask)[0]

  verify = jax.jit(forward)
  packed_tokens = jnp.ones((batch, packed), jnp.int32)
  one_token = jnp.ones((batch, 1), jnp.int32)
  return {
    "draft_ms": time_call(draft, (dparams, hidden, g0), 2, repeats)["min_ms"],
    "verify_ms": time_call(verify, (params, cache, packed_tokens), 2, repeats)["min_ms"],
    "decode_step_ms": time_call(verify, (params, cache, one_token), 2, repeats)["min_ms"],
  }


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("width", 128, "Base model width.", **fv)
  flags.DEFINE_integer("layers", 4, "Base model layers.", **fv)
  flags.DEFINE_integer("vocab", 2048, "Vocabulary size.", **fv)
  flags.DEFINE_integer("max_len", 128, "Base model context.", **fv)
  flags.DEFINE_integer("context", 64, "Tokens in the cache when drafting and verifying.", **fv)
  flags.DEFINE_integer("beam_width", 4, "Beams M.", **fv)
  flags.DEFINE_integer("draft_len", 4, "Draft length C.", **fv)
  flags.DEFINE_string("batch_sizes", "1,8", "Comma-separated batch sizes.", **fv)
  flags.DEFINE_integer("repeats", 30, "Calls per timing (the minimum is reported).", **fv)
  flags.DEFINE_string(
    "out", None, "JSON output (folders created; rewritten after every measurement).", **fv
  )


def _batch_sizes(text: str) -> list[int]:
  try:
    sizes = [int(b) for b in text.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) <= 0:
    raise cli.UserError(
      f"--batch_sizes {text!r} must be comma-separated positive integers, e.g. 1,8"
    )
  return sizes


def main(args: flags.FlagValues) -> dict:
  batch_sizes = _batch_sizes(args.batch_sizes)
  try:
    base = VanillaConfig(
      vocab_size=args.vocab, max_len=args.max_len, num_layers=args.layers, width=args.width
    )
  except ValueError as e:  # a bad size: one line, exit status 2
    raise cli.UserError(cli.one_line(e)) from e
  model = build_model(base)
  params = init_params(model, jax.random.key(0))
  meta = {
    name: args[name].value
    for name in (
      "width",
      "layers",
      "vocab",
      "max_len",
      "context",
      "beam_width",
      "draft_len",
      "batch_sizes",
      "repeats",
      "out",
    )
  }
  meta["device"] = jax.devices()[0].device_kind
  records = []
  for name, kwargs in VARIANTS.items():
    config = DrafterConfig.for_base(base, draft_len=args.draft_len, **kwargs)
    drafter = DraftHead(config)
    dparams = init_drafter(drafter, jax.random.key(2))
    cost = drafter_cost(config, base, beam_width=args.beam_width, context_len=args.context)
    for batch in batch_sizes:
      times = _timings(
        model, params, drafter, dparams, batch, args.beam_width, args.context, args.repeats
      )
      records.append(
        {
          "variant": name,
          "batch_size": batch,
          **cost,
          **times,
          "draft_over_verify": times["draft_ms"] / times["verify_ms"],
          "draft_over_decode_step": times["draft_ms"] / times["decode_step_ms"],
        }
      )
      if args.out:  # after every measurement, so a crash keeps what was measured
        cli.write_json_atomic(args.out, {"meta": meta, "results": records})
  report = {"meta": meta, "results": records}
  header = (
    f"{'variant':<42} {'B':>2} {'params':>7} {'FLOPs/tok':>9} {'FLOPs/step':>10} "
    f"{'draft ms':>8} {'verify ms':>9} {'step ms':>7} {'d/verify':>8} {'d/step':>6}"
  )
  print(
    f"base: {base.num_layers} layers, width {base.width}, vocab {base.vocab_size}; "
    f"M = {args.beam_width}, C = {args.draft_len}, context {args.context}; "
    f"device {jax.devices()[0].device_kind}"
  )
  print(header)
  for r in records:
    print(
      f"{r['variant']:<42} {r['batch_size']:>2} {r['params_fraction']:>7.3f} "
      f"{r['draft_token_fraction']:>9.3f} {r['step_fraction']:>10.3f} {r['draft_ms']:>8.2f} "
      f"{r['verify_ms']:>9.2f} {r['decode_step_ms']:>7.2f} {r['draft_over_verify']:>8.2f} "
      f"{r['draft_over_decode_step']:>6.2f}"
    )
  return report


if __name__ == "__main__":
  cli.run(main, define_flags)
