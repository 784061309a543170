r"""Generation throughput of block vs vanilla models (the Block Transformer paper's protocol).

    python -m experiments.throughput --preset cpu --out /tmp/throughput_cpu.json
    python -m experiments.throughput --preset paper --peak_bw_gbs 3350 \
        --out throughput_h100.json                     # one H100

Protocol: random weights, random prompts, EOS disabled. Each scenario is a
(prompt, generated) length pair: prefill_heavy 2048/128, decode_heavy
128/2048, no_prompt 1/2048 (`--preset cpu` divides the lengths by 8 so the 5M
pair finishes in a few minutes on 2 cores). Throughput = batch * generated
tokens / wall time of the whole compiled generate call (prefill included),
after --warmup untimed calls, for each of --repeats calls (default 3): the
report gives the min / median / max (tokens/s and MBU from the median), and
each block / vanilla ratio from the medians with its spread, the lowest and
highest ratio of the per-repeat figures (slowest block / fastest vanilla,
fastest block / slowest vanilla). The JSON is rewritten after every scenario
(atomically), so a crash keeps what was measured.

Batch size: a number, or `auto`: the largest batch whose compiled generate fits
--memory_budget_gb (default: 90% of the accelerator's memory), found by
compiling at batch 1 and 2 to measure memory per sample, then a search on the
compiled memory (XLA's memory analysis: arguments + outputs + temporaries).

Bytes moved (for model bandwidth utilisation, MBU = bytes / wall / peak): every
forward pass reads the non-embedding weights once (the token decoder and head
once per token, the block decoder once per block) and the valid part of the
KV caches; the prefill writes the prompt's cache. Embedding-table gathers are
not counted. The sizes come from the code that defines them, not from
parameter names: each cached step of the model (`VanillaLM.decode`;
`BlockTransformer.encode_blocks`, `expand` and `token_step`) is traced on
abstract parameters (`jax.eval_shape` of the init) and the parameters it
reads are summed, except those read only through a gather (an embedding
lookup); a cache slot's bytes are those of `init_stack_cache`, traced the
same way.

The decode loop runs in --cache_segments pieces (default 4), each attending
only over the cache slots it can have filled, so neither model reads its whole
preallocated cache at every step (a growing cache would read less still).

The context check of generation is lifted to the scenario's length (random
weights, rotary positions): 2048 + 128 tokens exceeds the trained 2048.
Models are the shipped gin files (gin_configs/models/NAME.gin).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bt_jax import cli
from bt_jax.config import ATTENTION_IMPLS, BlockConfig
from bt_jax.gin_utils import model_config_from_gin
from bt_jax.inference import generate_fn, kv_cache_bytes_per_sample, num_steps_for
from bt_jax.inference import caches as caches_lib
from bt_jax.inference.generation import left_pad
from bt_jax.models import build_model, init_params
from bt_jax.models.block import BlockTransformer
from bt_jax.models.vanilla import VanillaLM

SCENARIOS = {"prefill_heavy": (2048, 128), "decode_heavy": (128, 2048), "no_prompt": (1, 2048)}
CPU_SCENARIOS = {"prefill_heavy": (256, 16), "decode_heavy": (16, 256), "no_prompt": (1, 256)}

# (block, vanilla, why they are compared)
PAIRS = (
  ("block_b4_5m", "vanilla_5m", "equal non-embedding size"),
  ("block_b4_19m", "vanilla_19m", "equal non-embedding size"),
  ("block_b4_85m", "vanilla_85m", "equal non-embedding size"),
  ("block_b4_302m", "vanilla_302m", "equal non-embedding size"),
  ("block_b4_1p2b", "vanilla_302m", "similar loss"),
  ("block_b4_tiny", "vanilla_tiny", "tiny test pair"),
)

PRESETS = {
  "paper": dict(
    models="block_b4_5m,vanilla_5m,block_b4_85m,vanilla_85m,block_b4_1p2b,vanilla_302m",
    scenarios=",".join(SCENARIOS),
    batch_size="auto",
    dtype="bfloat16",
    peak_bw_gbs=3350.0,
    repeats=3,
    warmup=1,
  ),
  "cpu": dict(
    models="block_b4_5m,vanilla_5m",
    scenarios=",".join(CPU_SCENARIOS),
    batch_size="8",
    dtype="float32",
    peak_bw_gbs=20.0,
    repeats=3,
    warmup=1,
  ),
}


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Defaults for the flags below.", **fv)
  flags.DEFINE_string("models", None, "Comma-separated gin model names (gin_configs/models).", **fv)
  flags.DEFINE_string(
    "scenarios", None, "Comma-separated scenario names, or NAME=PROMPT/NEW (e.g. tiny=8/8).", **fv
  )
  flags.DEFINE_string("batch_size", None, "A batch size, or 'auto'.", **fv)
  flags.DEFINE_float(
    "memory_budget_gb",
    None,
    "Memory for `auto` (default: 90% of the device's, or 4 GB on CPU).",
    **fv,
  )
  flags.DEFINE_integer("max_batch_size", 1024, "Upper bound of the `auto` search.", **fv)
  flags.DEFINE_float("peak_bw_gbs", None, "Peak memory bandwidth for MBU, GB/s.", **fv)
  flags.DEFINE_integer(
    "repeats", None, "Timed calls per measurement (default 3): min / median / max reported.", **fv
  )
  flags.DEFINE_integer("warmup", None, "Untimed calls first (the first one compiles).", **fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Param and compute dtype.", **fv)
  flags.DEFINE_string(
    "out", None, "JSON output path (its folder is created; rewritten after every scenario).", **fv
  )
  flags.DEFINE_integer(
    "cache_segments", 4, "Decode loop pieces; each reads only the filled part of the caches.", **fv
  )
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.", **fv)
  flags.DEFINE_enum(
    "attention_impl",
    None,
    list(ATTENTION_IMPLS),
    "Override the models' attention_impl (prefill and training-style "
    "attention; e.g. pallas or cudnn on a GPU).",
    **fv,
  )


def parse_scenarios(spec: str, preset: str) -> dict[str, tuple[int, int]]:
  known = CPU_SCENARIOS if preset == "cpu" else SCENARIOS
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if "=" in item:
      name, lengths = item.split("=", 1)
      try:
        prompt, new = (int(x) for x in lengths.split("/"))
      except ValueError as e:
        raise cli.UserError(f"bad scenario {item!r}; write NAME=PROMPT/NEW, e.g. tiny=8/8") from e
      out[name] = (prompt, new)
    elif item in known:
      out[item] = known[item]
    else:
      raise cli.UserError(
        f"unknown scenario {item!r}; valid names are {list(known)} or NAME=PROMPT/NEW"
      )
  return out


def benchmark_config(
  name: str, dtype: str, prompt_len: int, new_tokens: int, attention_impl: Optional[str] = None
):
  config = model_config_from_gin([f"models/{name}.gin"])
  block_len = config.tokens_per_step
  needed = config.aligned_length(prompt_len) + num_steps_for(config, new_tokens) * block_len
  config = dataclasses.replace(
    config, dtype=dtype, param_dtype=dtype, max_len=max(config.max_len, needed)
  )
  if attention_impl is not None:
    config = dataclasses.replace(config, attention_impl=attention_impl)
  return config


def random_prompts(config, batch: int, prompt_len: int, rng: np.random.Generator):
  """Random prompts of one length, left-padded as generation pads them
  (`bt_jax.inference.generation.left_pad`): (tokens, pad)."""
  ids = rng.integers(1, config.vocab_size, size=(batch, prompt_len), dtype=np.int32)
  tokens, pad = left_pad(ids.tolist(), config)
  return jnp.asarray(tokens), jnp.asarray(pad)


def compile_for(fn, params, batch: int, config, prompt_len: int):
  """(compiled generate for `batch` rows, its bytes: arguments + outputs + temporaries)."""
  tokens, pad = random_prompts(config, batch, prompt_len, np.random.default_rng(0))
  compiled = fn.lower(params, tokens, pad, jax.random.key(0)).compile()
  stats = compiled.memory_analysis()
  return compiled, int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def auto_batch_size(fn, params, config, prompt_len: int, budget: float, max_batch: int) -> dict:
  """The largest batch whose compiled memory fits `budget` bytes (and its executable)."""
  executables = {}

  sizes = {}

  def compiled_bytes(batch):
    if batch not in sizes:
      executables[batch], sizes[batch] = compile_for(fn, params, batch, config, prompt_len)
    return sizes[batch]

  one = compiled_bytes(1)
  two = compiled_bytes(2)
  per_sample = max(two - one, 1)
  if one > budget:
    raise cli.UserError(
      f"batch 1 needs {one / 1e9:.2f} GB, over the memory budget "
      f"{budget / 1e9:.2f} GB; raise --memory_budget_gb"
    )
  guess = int(min(max_batch, max(1, (budget - (one - per_sample)) // per_sample)))
  # Memory is close to linear in the batch, so the guess is near: gallop away
  # from it until the answer is bracketed (lo fits, hi does not or is past the
  # cap), then bisect to within ~6%. Typically 4 compiles in all.
  step = max(1, guess // 16)
  if compiled_bytes(guess) <= budget:
    lo, hi = guess, max_batch + 1
    while lo < max_batch:
      candidate = min(max_batch, lo + step)
      if compiled_bytes(candidate) > budget:
        hi = candidate
        break
      lo, step = candidate, 2 * step
  else:
    lo, hi = 1, guess
    while hi > 1:
      candidate = max(1, hi - step)
      if compiled_bytes(candidate) <= budget:
        lo = candidate
        break
      hi, step = candidate, 2 * step
  while hi - lo > max(1, lo // 16):
    mid = (lo + hi) // 2
    if compiled_bytes(mid) <= budget:
      lo = mid
    else:
      hi = mid
  return {
    "batch_size": lo,
    "memory_per_sample_bytes": per_sample,
    "fixed_memory_bytes": one - per_sample,
    "executable": executables[lo],
  }


_PASS_THROUGH = ("convert_element_type", "copy")


def _read_densely(jaxpr, var) -> bool:
  """Whether `var` is read beyond a gather in `jaxpr` (following it into
  sub-computations such as jit and remat, and through dtype casts)."""
  for eqn in jaxpr.eqns:
    for position, invar in enumerate(eqn.invars):
      if invar is not var:
        continue
      name = eqn.primitive.name
      if name == "gather" and position == 0:
        continue  # an embedding lookup: a few rows
      if name in _PASS_THROUGH:
        if any(_read_densely(jaxpr, out) for out in eqn.outvars):
          return True
        continue
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
      if sub is not None and len(sub.invars) == len(eqn.invars):
        if _read_densely(sub, sub.invars[position]):
          return True
        continue
      return True
  return False


def step_weight_bytes(fn, params, *args) -> int:
  """Bytes of the parameters `fn(params, *args)` reads (module docstring):
  traced with abstract values, so nothing is computed or allocated."""
  closed = jax.make_jaxpr(fn)(params, *args)
  leaves = jax.tree_util.tree_leaves(params)
  return int(
    sum(
      leaf.size * np.dtype(leaf.dtype).itemsize
      for leaf, var in zip(leaves, closed.jaxpr.invars)
      if _read_densely(closed.jaxpr, var)
    )
  )


def cache_slot_bytes(stack, dtype) -> int:
  """Bytes one position adds to one row of a stack's KV cache, from the cache's init."""
  return caches_lib.cache_bytes(
    jax.eval_shape(lambda: caches_lib.init_stack_cache(stack, 1, 1, dtype))
  )


def _spec(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(shape, dtype)


def per_pass_bytes(model) -> dict[str, int]:
  """Weights each cached forward pass reads and the KV bytes of one cache slot.

  Vanilla: {"weights_per_token", "slot"}. Block: {"weights_per_block" (embedder,
  block decoder, expansion), "weights_per_token" (token decoder, head),
  "block_slot", "token_slot"}.
  """
  config = model.config
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  dtype = config.compute_dtype

  def apply(method):
    return lambda p, *args: model.apply({"params": p}, *args, method=method)

  if isinstance(config, BlockConfig):
    block_cache = jax.eval_shape(
      lambda: caches_lib.init_stack_cache(config.block_stack, 1, 1, dtype)
    )
    local_len = config.token_decoder_len
    token_cache = jax.eval_shape(
      lambda: caches_lib.init_stack_cache(config.token_stack, 1, local_len, dtype)
    )
    memory = (
      _spec((1, config.num_expanded, config.token_width), dtype)
      if config.token_decoder == "cross_attention"
      else None
    )
    encode = step_weight_bytes(
      apply(BlockTransformer.encode_blocks),
      params,
      _spec((1, 1, config.block_len)),
      _spec((1, 1)),
      block_cache,
      0,
      _spec((1, 1, 1), bool),
    )
    expand = step_weight_bytes(
      apply(BlockTransformer.expand), params, _spec((1, config.block_width), dtype)
    )
    token = step_weight_bytes(
      lambda p, *args: model.apply(
        {"params": p}, *args, memory=memory, method=BlockTransformer.token_step
      ),
      params,
      _spec((1, 1, config.token_width), dtype),
      _spec((1,)),
      token_cache,
      0,
      _spec((1, 1, local_len), bool),
    )
    return {
      "weights_per_block": encode + expand,
      "weights_per_token": token,
      "block_slot": cache_slot_bytes(config.block_stack, dtype),
      "token_slot": cache_slot_bytes(config.token_stack, dtype),
    }
  cache = jax.eval_shape(lambda: caches_lib.init_stack_cache(config.stack, 1, 1, dtype))
  token = step_weight_bytes(
    apply(VanillaLM.decode), params, _spec((1, 1)), _spec((1, 1)), cache, 0, _spec((1, 1, 1), bool)
  )
  return {"weights_per_token": token, "slot": cache_slot_bytes(config.stack, dtype)}


def bytes_moved(model, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Weights and KV-cache bytes the whole generate call must move (see module doc)."""
  config = model.config
  sizes = per_pass_bytes(model)
  if isinstance(config, BlockConfig):
    block_len = config.block_len
    prompt_blocks = -(-prompt_len // block_len)
    steps = num_steps_for(config, new_tokens)
    block_slot, token_slot = sizes["block_slot"], sizes["token_slot"]
    per_block_weights, per_token_weights = sizes["weights_per_block"], sizes["weights_per_token"]
    total = per_block_weights + batch * prompt_blocks * block_slot  # prefill
    first = config.token_decoder_len - block_len + 1  # slots filled by the first pass
    local_reads = sum(first + j for j in range(block_len))
    for step in range(steps):
      total += per_block_weights + batch * (prompt_blocks + step + 1) * block_slot
      total += block_len * per_token_weights + batch * local_reads * token_slot
    return float(total)
  slot, weights = sizes["slot"], sizes["weights_per_token"]
  total = weights + batch * prompt_len * slot
  total += new_tokens * weights + batch * slot * sum(prompt_len + t + 1 for t in range(new_tokens))
  return float(total)


def memory_budget_bytes(flag_gb: Optional[float]) -> float:
  if flag_gb:
    return flag_gb * 1e9
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return 0.9 * stats["bytes_limit"]
  return 4e9


def run_one(
  name: str,
  scenario: str,
  prompt_len: int,
  new_tokens: int,
  *,
  batch_spec: str,
  dtype: str,
  budget: Optional[float],
  max_batch: int,
  repeats: int,
  warmup: int,
  peak_bw_gbs: float,
  seed: int,
  cache_segments: int,
  attention_impl: Optional[str] = None,
) -> dict:
  config = benchmark_config(name, dtype, prompt_len, new_tokens, attention_impl)
  model = build_model(config)
  params = init_params(model, jax.random.key(seed))
  fn = generate_fn(model, new_tokens, segments=cache_segments)  # greedy, EOS disabled
  search = {}
  if batch_spec == "auto":
    search = auto_batch_size(fn, params, config, prompt_len, memory_budget_bytes(budget), max_batch)
    batch = search["batch_size"]
    fn = search.pop("executable")
  else:
    batch = int(batch_spec)
  tokens, pad = random_prompts(config, batch, prompt_len, np.random.default_rng(seed))
  rng = jax.random.key(seed)
  start = time.perf_counter()
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(params, tokens, pad, rng))
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, tokens, pad, rng))
    times.append(time.perf_counter() - start)
  wall = float(np.median(times))
  moved = bytes_moved(model, batch, prompt_len, new_tokens)
  generated = batch * new_tokens
  aligned_prompt = config.aligned_length(prompt_len)
  steps = 1 + num_steps_for(config, new_tokens)  # prefill + decode steps
  return {
    "model": name,
    "kind": config.kind,
    "scenario": scenario,
    "prompt_len": prompt_len,
    "new_tokens": new_tokens,
    "batch_size": batch,
    "dtype": dtype,
    "tokens_per_s": generated / wall,
    "tokens_per_s_min": generated / max(times),
    "tokens_per_s_max": generated / min(times),
    "wall_s": wall,
    "wall_s_min": min(times),
    "wall_s_max": max(times),
    "wall_s_repeats": times,
    "repeats": repeats,
    "warmup_s": warmup_s,
    "kv_cache_bytes_per_sample": kv_cache_bytes_per_sample(config, aligned_prompt, new_tokens),
    "bytes_moved": moved,
    "bytes_per_step": moved / steps,
    "mbu": moved / wall / (peak_bw_gbs * 1e9),
    "peak_bw_gbs": peak_bw_gbs,
    **search,
  }


def pair_ratios(results: list[dict]) -> list[dict]:
  """Block / vanilla tokens/s of each pair of PAIRS measured in a scenario:
  the ratio of the medians, and its spread from the per-repeat figures."""
  by_key = {(r["model"], r["scenario"]): r for r in results}
  ratios = []
  for block, vanilla, why in PAIRS:
    for scenario in dict.fromkeys(r["scenario"] for r in results):
      b, v = by_key.get((block, scenario)), by_key.get((vanilla, scenario))
      if b and v:
        ratios.append(
          {
            "block": block,
            "vanilla": vanilla,
            "pair": why,
            "scenario": scenario,
            "block_tokens_per_s": b["tokens_per_s"],
            "vanilla_tokens_per_s": v["tokens_per_s"],
            "ratio": b["tokens_per_s"] / v["tokens_per_s"],
            # the spread: slowest block repeat / fastest vanilla one, and back
            "ratio_min": b["tokens_per_s_min"] / v["tokens_per_s_max"],
            "ratio_max": b["tokens_per_s_max"] / v["tokens_per_s_min"],
          }
        )
  return ratios


def format_table(results: list[dict], ratios: list[dict]) -> str:
  lines = [
    f"{'model':<16}{'scenario':<16}{'batch':>7}{'tokens/s':>12}{'min..max':>22}"
    f"{'wall s':>9}{'KV B/sample':>13}{'MBU':>8}"
  ]
  for r in results:
    spread = f"{r['tokens_per_s_min']:.1f}..{r['tokens_per_s_max']:.1f}"
    lines.append(
      f"{r['model']:<16}{r['scenario']:<16}{r['batch_size']:>7}"
      f"{r['tokens_per_s']:>12.1f}{spread:>22}{r['wall_s']:>9.3f}"
      f"{r['kv_cache_bytes_per_sample']:>13,}{r['mbu']:>8.3f}"
    )
  if ratios:
    lines.append("")
    lines.append(f"{'block / vanilla':<32}{'scenario':<16}{'ratio':>8}{'min..max':>16}")
    for r in ratios:
      spread = f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f}"
      lines.append(
        f"{r['block'] + ' / ' + r['vanilla']:<32}{r['scenario']:<16}{r['ratio']:>7.2f}x{spread:>16}"
      )
  return "\n".join(lines)


def run(
  *,
  preset: str = "cpu",
  models: Optional[str] = None,
  scenarios: Optional[str] = None,
  batch_size: Optional[str] = None,
  memory_budget_gb: Optional[float] = None,
  max_batch_size: int = 1024,
  peak_bw_gbs: Optional[float] = None,
  repeats: Optional[int] = None,
  warmup: Optional[int] = None,
  dtype: Optional[str] = None,
  out: Optional[str] = None,
  seed: int = 0,
  cache_segments: int = 4,
  attention_impl: Optional[str] = None,
) -> dict:
  """Runs every model x scenario; returns the report and writes it to `out`
  after every measurement (atomically; "complete" says whether all ran)."""
  defaults = PRESETS[preset]
  names = [m.strip() for m in (models or defaults["models"]).split(",") if m.strip()]
  chosen = parse_scenarios(scenarios or defaults["scenarios"], preset)
  batch_spec = batch_size or defaults["batch_size"]
  if batch_spec != "auto" and not (batch_spec.isdigit() and int(batch_spec) > 0):
    raise cli.UserError(f"batch_size must be a positive integer or 'auto', got {batch_spec!r}")
  repeats = defaults["repeats"] if repeats is None else repeats
  if repeats < 1:
    raise cli.UserError(f"repeats must be at least 1, got {repeats}")
  settings = dict(
    batch_spec=batch_spec,
    dtype=dtype or defaults["dtype"],
    budget=memory_budget_gb,
    max_batch=max_batch_size,
    repeats=repeats,
    warmup=defaults["warmup"] if warmup is None else warmup,
    peak_bw_gbs=peak_bw_gbs or defaults["peak_bw_gbs"],
    seed=seed,
    cache_segments=cache_segments,
    attention_impl=attention_impl,
  )
  start = time.perf_counter()
  results = []

  def report(complete: bool) -> dict:
    value = {
      "preset": preset,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
      "scenarios": chosen,
      "settings": dict(settings),
      "results": results,
      "ratios": pair_ratios(results),
      "complete": complete,
      "total_wall_s": time.perf_counter() - start,
    }
    if out:
      cli.write_json_atomic(out, value)
    return value

  for scenario, (prompt_len, new_tokens) in chosen.items():
    for name in names:
      results.append(run_one(name, scenario, prompt_len, new_tokens, **settings))
      r = results[-1]
      print(
        f"{name} {scenario}: batch {r['batch_size']}, {r['tokens_per_s']:.1f} tokens/s "
        f"(min {r['tokens_per_s_min']:.1f}, max {r['tokens_per_s_max']:.1f} over "
        f"{r['repeats']} calls), {r['wall_s']:.3f} s per call",
        flush=True,
      )
      report(complete=False)
  final = report(complete=True)
  print(format_table(results, final["ratios"]))
  print(f"total wall time {final['total_wall_s']:.1f} s on {final['device']}")
  return final


def main(flag_values: flags.FlagValues) -> dict:
  args = flag_values
  return run(
    preset=args.preset,
    models=args.models,
    scenarios=args.scenarios,
    batch_size=args.batch_size,
    memory_budget_gb=args.memory_budget_gb,
    max_batch_size=args.max_batch_size,
    peak_bw_gbs=args.peak_bw_gbs,
    repeats=args.repeats,
    warmup=args.warmup,
    dtype=args.dtype,
    out=args.out,
    seed=args.seed,
    cache_segments=args.cache_segments,
    attention_impl=args.attention_impl,
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
