r"""bt_jax generation side by side with Hugging Face transformers, on the same weights.

    python -m experiments.peer_bench --models vanilla_5m,vanilla_19m \
        --scenarios decode_heavy,prefill_heavy --preset cpu --out peer_cpu.json
    python -m experiments.peer_bench --preset gpu --out peer_gpu.json    # a CUDA GPU

What a user choosing bt_jax asks first: how fast is it next to the GPT-NeoX
implementation they already use, `transformers.GPTNeoXForCausalLM.generate`
(PyTorch), which the Block Transformer paper (Ho et al. 2024, arXiv
2406.02657) also used for its vanilla baseline.

Protocol (that of `experiments.throughput`, whose scenarios, prompts and
model configs this reuses):

- Random weights are made once per model in bt_jax, written as a workdir and
  exported with `bt_jax.convert.to_hf` (`python -m bt_jax.convert to_hf`);
  transformers loads that folder with `GPTNeoXForCausalLM.from_pretrained`.
- Both sides generate greedily from the same random prompts (batch x prompt
  length), forcing the full length: bt_jax with EOS disabled, transformers
  with no `eos_token_id` (so no stopping and no logits processor).
- Calls alternate within one process (bt_jax, transformers, bt_jax, ...):
  --warmup untimed rounds first (compilation lands there), then --repeats
  timed rounds. Throughput = batch * generated tokens / wall time of the whole
  generate call (prefill included). The report gives tokens/s min / median /
  max for each side and the ratio of the medians with its spread: the lowest
  and highest ratio of the per-call figures (slowest bt_jax / fastest
  transformers, and back), plus the ratio of each round's pair of calls.
- The tokens of the two sides are compared row by row; the report gives the
  first position where any row differs (float32 summation order can flip a
  near-tie of the argmax; after that the continuations part). At least the
  first min(32, generated) must agree, or the run fails after writing its JSON.
- A block model (`block_b4_*`) has no transformers equivalent: it runs in the
  same rounds against the transformers vanilla model of equal non-embedding
  size (`experiments.throughput.PAIRS`), as the paper compares them, and its
  ratio is reported beside the paper's (its throughput table, one H100).

transformers runs in its fastest CPU configuration: `torch.inference_mode`,
`attn_implementation="sdpa"`, and (--hf_compile auto, the default) a static
cache with the decode step compiled by `torch.compile` (transformers'
`CompileConfig`; on a CPU it needs `_compile_all_devices`). If compiling
fails, the dynamic-cache eager path runs instead and the report says why
(`hf_mode`, `hf_compile_error`). On a CPU both are timed in the warm-up and
the faster one is used for the timed rounds, since compiled is not always
faster there; `hf_warmup_s` records both. --preset gpu: bfloat16 on both
sides, the paper's scenarios, transformers with SDPA and the static cache
compiled (CUDA graphs, transformers' default compile mode); it is refused on a
machine without a CUDA GPU for both JAX and PyTorch.

Bad input (an unknown model, an unknown scenario, a scenario longer than a
model's context, --preset gpu without a GPU) is refused before any weights
are made: one line on stderr, exit status 2. The context is the model's
`max_len` (its gin file), or --context: the gpu preset lifts it to 2176 for
the paper's prefill-heavy 2048 + 128 (random weights with rotary positions
have no learned limit; `experiments.throughput` lifts it the same way).

torch and transformers are benchmark and test dependencies only (`pip install
-r requirements-test.txt`); bt_jax itself never imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Optional

from absl import flags
import jax
import numpy as np

from bt_jax import cli, convert
from bt_jax.convert.workdir import write_workdir
from bt_jax.data.tokenizer import train_bpe
from bt_jax.gin_utils import model_config_from_gin
from bt_jax.inference import generate_fn, num_steps_for
from bt_jax.models import build_model, init_params
from experiments import op_profile, throughput

MODELS_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs", "models"
)
MIN_AGREE = 32
GPU_CONTEXT = 2048 + 128  # the paper's prefill-heavy scenario, past the trained 2048

# The paper's generation throughput on one H100 (thousands of tokens/s,
# prefill-heavy / decode-heavy; Ho et al. 2024, arXiv 2406.02657, throughput table),
# vanilla measured with transformers' generate. block / vanilla ratios follow.
PAPER_TOKENS_PER_S = {
  ("block_b4_5m", "vanilla_5m"): {"prefill_heavy": (272.3, 10.8), "decode_heavy": (809.5, 41.6)},
  ("block_b4_85m", "vanilla_85m"): {"prefill_heavy": (59.0, 2.3), "decode_heavy": (134.7, 6.2)},
  ("block_b4_1p2b", "vanilla_302m"): {"prefill_heavy": (12.4, 0.8), "decode_heavy": (25.7, 2.1)},
}

PRESETS = {
  "cpu": dict(
    models="vanilla_5m,vanilla_19m,block_b4_5m,block_b4_19m",
    scenarios="decode_heavy,prefill_heavy",
    batch_size=8,
    dtype="float32",
    repeats=3,
    warmup=1,
    context=None,
  ),
  "gpu": dict(
    models="vanilla_5m,block_b4_5m,vanilla_85m,block_b4_85m",
    scenarios=",".join(throughput.SCENARIOS),
    batch_size=64,
    dtype="bfloat16",
    repeats=3,
    warmup=1,
    context=GPU_CONTEXT,
  ),
}

INSTALL_HINT = (
  "pip install -r requirements-test.txt (torch 2.13 CPU build and "
  "transformers>=5.24; see the comments in that file)"
)


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Defaults for the flags below.", **fv)
  flags.DEFINE_string(
    "models",
    None,
    "Comma-separated gin model names (gin_configs/models); "
    "block models run against the transformers vanilla of their size.",
    **fv,
  )
  flags.DEFINE_string(
    "scenarios", None, "Comma-separated scenario names, or NAME=PROMPT/NEW (e.g. tiny=8/8).", **fv
  )
  flags.DEFINE_integer("batch_size", None, "Rows per generate call.", **fv)
  flags.DEFINE_integer("repeats", None, "Timed rounds (default 3): min / median / max.", **fv)
  flags.DEFINE_integer("warmup", None, "Untimed rounds first (the first one compiles).", **fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Param and compute dtype.", **fv)
  flags.DEFINE_integer(
    "context",
    None,
    "Longest prompt + generated length accepted (default: "
    "each model's max_len; the gpu preset: 2176).",
    **fv,
  )
  flags.DEFINE_enum(
    "hf_compile",
    "auto",
    ["auto", "on", "off"],
    "transformers' static cache + torch.compile: auto tries it and falls back "
    "to the eager dynamic cache (on a CPU, keeps the faster); on: only "
    "compiled; off: only eager.",
    **fv,
  )
  flags.DEFINE_integer(
    "cache_segments", 4, "bt_jax decode loop pieces (as experiments.throughput).", **fv
  )
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.", **fv)
  flags.DEFINE_bool(
    "profile",
    False,
    "After each scenario's timed rounds, profile one more call of each side "
    "(jax.profiler / torch.profiler; experiments.op_profile): time per op, "
    "in the JSON and printed.",
    **fv,
  )
  flags.DEFINE_string(
    "out",
    None,
    "JSON output path (its folder is created; rewritten after every measurement).",
    **fv,
  )


# ---------------------------------------------------------------------------
# Input checks: nothing here makes weights.


def known_models() -> list[str]:
  names = (
    os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(MODELS_DIR, "*.gin"))
  )
  return sorted(n for n in names if not n.endswith("_base"))


def hf_partner(name: str) -> str:
  """The vanilla model transformers runs against `name`: itself, or a block
  model's pair in `experiments.throughput.PAIRS`."""
  if name.startswith("vanilla_"):
    return name
  for block, vanilla, _ in throughput.PAIRS:
    if block == name:
      return vanilla
  raise cli.UserError(
    f"model {name!r} has no vanilla partner; block models with one are "
    f"{[b for b, _, _ in throughput.PAIRS]}"
  )


def parse_models(spec: str) -> list[str]:
  names = list(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
  if not names:
    raise cli.UserError(f"no models given; valid names are {known_models()}")
  valid = known_models()
  for name in names:
    if name not in valid:
      raise cli.UserError(f"unknown model {name!r}; valid names are {valid}")
    hf_partner(name)
  return names


def needed_length(config, prompt_len: int, new_tokens: int) -> int:
  """Positions a generate call of this scenario fills (block models align the
  prompt to a block boundary and generate whole blocks)."""
  return (
    config.aligned_length(prompt_len) + num_steps_for(config, new_tokens) * config.tokens_per_step
  )


def check_context(
  names: list[str], chosen: dict[str, tuple[int, int]], context: Optional[int]
) -> dict[str, Any]:
  """The gin configs of `names` and their vanilla partners (no weights), after
  refusing a scenario longer than a model's context."""
  configs = {}
  for name in dict.fromkeys(names + [hf_partner(n) for n in names]):
    config = model_config_from_gin([f"models/{name}.gin"])
    limit = context or config.max_len
    fits = [s for s, (p, n) in chosen.items() if needed_length(config, p, n) <= limit]
    for scenario, (prompt_len, new_tokens) in chosen.items():
      needed = needed_length(config, prompt_len, new_tokens)
      if needed > limit:
        raise cli.UserError(
          f"scenario {scenario!r} ({prompt_len} prompt + {new_tokens} generated tokens, "
          f"{needed} positions) is longer than model {name!r}'s context of {limit}; "
          f"scenarios that fit: {fits or 'none'} (or NAME=PROMPT/NEW with PROMPT + NEW <= "
          f"{limit}, or a larger --context)"
        )
    configs[name] = config
  return configs


def import_torch():
  """(torch, transformers), or a UserError saying how to install them."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise cli.UserError(
      f"the peer benchmark needs torch and transformers ({e}); install them with: {INSTALL_HINT}"
    ) from e
  return torch, transformers


def check_gpu(torch) -> None:
  if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    raise cli.UserError(
      f"--preset gpu needs a CUDA GPU for both JAX and PyTorch; found JAX backend "
      f"{jax.default_backend()!r} and torch.cuda.is_available()="
      f"{torch.cuda.is_available()}; use --preset cpu here"
    )


# ---------------------------------------------------------------------------
# The two sides.


def lifted(config, chosen: dict[str, tuple[int, int]], dtype: str):
  """`config` in `dtype`, its max_len raised to the longest scenario (checked
  against the context already)."""
  longest = max(needed_length(config, p, n) for p, n in chosen.values())
  return dataclasses.replace(
    config, dtype=dtype, param_dtype=dtype, max_len=max(config.max_len, longest)
  )


def export_to_hf(config, params, folder: str) -> str:
  """Writes the params as a bt_jax workdir and exports it with `convert.to_hf`
  (the library function behind `python -m bt_jax.convert to_hf`)."""
  # Random prompts are token ids; the tokenizer only has to exist (to_hf copies it).
  tokenizer = train_bpe(["peer benchmark"], vocab_size=300)
  workdir = os.path.join(folder, "workdir")
  write_workdir(
    workdir,
    config,
    jax.device_get(params),
    tokenizer.to_json(),
    info={"source": "experiments.peer_bench random weights"},
  )
  return convert.to_hf(workdir, os.path.join(folder, "hf"))


class BtJaxSide:
  """One bt_jax model: random weights and the compiled greedy generate."""

  def __init__(self, name: str, config, seed: int, cache_segments: int):
    self.name, self.config, self.cache_segments = name, config, cache_segments
    self.model = build_model(config)
    self.params = init_params(self.model, jax.random.key(seed))
    self.seed = seed

  def prepare(self, batch: int, prompt_len: int, new_tokens: int):
    self.fn = generate_fn(self.model, new_tokens, segments=self.cache_segments)
    self.tokens, self.pad = throughput.random_prompts(
      self.config, batch, prompt_len, np.random.default_rng(self.seed)
    )
    self.rng = jax.random.key(self.seed)

  def call(self) -> np.ndarray:
    """One generate call, waited for; the generated tokens [batch, new]."""
    out = jax.block_until_ready(self.fn(self.params, self.tokens, self.pad, self.rng))
    return out.tokens


class HfSide:
  """A transformers GPTNeoXForCausalLM loaded from the exported folder."""

  def __init__(self, name: str, config, folder: str, device: str, compile_mode: str, seed: int):
    torch, transformers = import_torch()
    self.torch, self.transformers = torch, transformers
    self.name, self.config, self.device, self.compile_mode = name, config, device, compile_mode
    self.seed = seed
    self.model = (
      transformers.GPTNeoXForCausalLM.from_pretrained(
        folder, attn_implementation="sdpa", dtype=getattr(torch, config.param_dtype)
      )
      .to(device)
      .eval()
    )
    config = self.model.generation_config
    config.eos_token_id = None  # forced full length: no stopping, no EOS processor
    config.pad_token_id = 0
    self.mode = self.compile_error = self.modes_agree_first = None
    self.warmup_s: dict[str, list[float]] = {}
    self.selection_s: dict[str, float] = {}

  def prepare(self, batch: int, prompt_len: int, new_tokens: int):
    """The prompts of `BtJaxSide.prepare` for the same vanilla config and seed:
    equal lengths, so no padding and no attention mask to apply."""
    torch = self.torch
    tokens, pad = throughput.random_prompts(
      self.config, batch, prompt_len, np.random.default_rng(self.seed)
    )
    assert not np.asarray(pad).any() and tokens.shape == (batch, prompt_len)
    self.input_ids = torch.tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
    self.new_tokens = new_tokens

  def _compile_config(self):
    if self.device == "cpu":
      # CUDA graphs (transformers' default "reduce-overhead") do not exist on a CPU.
      config = self.transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default")
      config._compile_all_devices = True  # pylint: disable=protected-access
      return config
    return self.transformers.CompileConfig(fullgraph=True, dynamic=False)

  def _generate(self, mode: str):
    kwargs = {}
    if mode == "static_compiled":
      kwargs = dict(cache_implementation="static", compile_config=self._compile_config())
    with self.torch.inference_mode():
      out = self.model.generate(
        self.input_ids,
        attention_mask=self.torch.ones_like(self.input_ids),
        max_new_tokens=self.new_tokens,
        do_sample=False,
        **kwargs,
      )
    if self.device != "cpu":
      self.torch.cuda.synchronize()
    if mode == "static_compiled" and not hasattr(self.model, "_compiled_call"):
      raise RuntimeError("generate did not compile the forward pass")
    return out

  def call(self, mode: Optional[str] = None) -> np.ndarray:
    out = self._generate(mode or self.mode)
    return out[:, self.input_ids.shape[1] :].cpu().numpy()

  def warm_up(self, calls: int) -> np.ndarray:
    """Untimed calls in each candidate mode, then picks the mode the timed
    rounds use; returns its tokens (the compiled mode gets at least 2 calls).
    On a CPU with --hf_compile auto both modes run and one more call of each
    decides;
    on a GPU the compiled one runs unless compiling fails."""
    candidates = {
      "auto": ["static_compiled", "eager_dynamic"],
      "on": ["static_compiled"],
      "off": ["eager_dynamic"],
    }[self.compile_mode]
    choose = self.device == "cpu" and len(candidates) > 1
    self.warmup_s, self.selection_s, self.compile_error = {}, {}, None
    tokens = {}
    for mode in candidates:
      if tokens and not choose:
        break
      times = []
      try:
        # compiled: at least 2 untimed calls (the first compiles; the second
        # may still recompile as torch.compile's guards settle)
        for _ in range(max(calls, 2 if mode == "static_compiled" else 1)):
          begin = time.perf_counter()
          tokens[mode] = self.call(mode)
          times.append(time.perf_counter() - begin)
        if choose:
          begin = time.perf_counter()
          self.call(mode)
          self.selection_s[mode] = time.perf_counter() - begin
      except Exception as e:  # pylint: disable=broad-except
        if mode != "static_compiled" or self.compile_mode == "on":
          raise
        self.compile_error = f"{type(e).__name__}: {cli.one_line(e)}"[:500]
        tokens.pop(mode, None)
        continue
      self.warmup_s[mode] = times
    if self.selection_s:
      self.mode = min(self.selection_s, key=self.selection_s.get)
    else:
      self.mode = next(iter(tokens))
    if len(tokens) > 1:
      self.modes_agree_first = first_divergence(*tokens.values())
    else:
      self.modes_agree_first = None
    return tokens[self.mode]


# ---------------------------------------------------------------------------
# Statistics and the report.


def summary(times: list[float], work: int) -> dict[str, Any]:
  """tokens/s min / median / max over per-call wall times (`work` tokens each)."""
  wall = statistics.median(times)
  return {
    "tokens_per_s": work / wall,
    "tokens_per_s_min": work / max(times),
    "tokens_per_s_max": work / min(times),
    "wall_s": wall,
    "wall_s_min": min(times),
    "wall_s_max": max(times),
    "wall_s_repeats": list(times),
  }


def first_divergence(a: np.ndarray, b: np.ndarray) -> int:
  """The first generated position where any row of `a` and `b` differs (their
  length if none does)."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"token shapes differ: {a.shape} vs {b.shape}")
  differs = np.nonzero((a != b).any(axis=0))[0]
  return int(differs[0]) if differs.size else int(a.shape[1])


def paper_ratio(block: str, vanilla: str, scenario: str) -> Optional[float]:
  figures = PAPER_TOKENS_PER_S.get((block, vanilla), {}).get(scenario)
  return None if figures is None else figures[0] / figures[1]


def comparison(bt: dict, hf: dict, pair: str) -> dict[str, Any]:
  rounds = [h / b for b, h in zip(bt["wall_s_repeats"], hf["wall_s_repeats"])]
  value = {
    "bt_model": bt["model"],
    "hf_model": hf["model"],
    "scenario": bt["scenario"],
    "pair": pair,
    "batch_size": bt["batch_size"],
    "bt_tokens_per_s": bt["tokens_per_s"],
    "hf_tokens_per_s": hf["tokens_per_s"],
    "ratio": bt["tokens_per_s"] / hf["tokens_per_s"],
    "ratio_min": bt["tokens_per_s_min"] / hf["tokens_per_s_max"],
    "ratio_max": bt["tokens_per_s_max"] / hf["tokens_per_s_min"],
    "round_ratios": rounds,
  }
  if pair != "same weights":
    value["paper_ratio"] = paper_ratio(bt["model"], hf["model"], bt["scenario"])
  return value


def format_table(results: list[dict], comparisons: list[dict]) -> str:
  lines = [
    f"{'side':<8}{'model':<15}{'scenario':<15}{'batch':>6}{'tokens/s':>11}{'min..max':>20}  mode"
  ]
  for r in results:
    spread = f"{r['tokens_per_s_min']:.1f}..{r['tokens_per_s_max']:.1f}"
    lines.append(
      f"{r['engine']:<8}{r['model']:<15}{r['scenario']:<15}{r['batch_size']:>6}"
      f"{r['tokens_per_s']:>11.1f}{spread:>20}  {r.get('mode', '')}"
    )
  if comparisons:
    lines += [
      "",
      f"{'bt_jax / transformers':<30}{'scenario':<15}{'ratio':>7}{'min..max':>14}"
      f"{'rounds':>14}  tokens agree / paper",
    ]
    for c in comparisons:
      spread = f"{c['ratio_min']:.2f}..{c['ratio_max']:.2f}"
      rounds = f"{min(c['round_ratios']):.2f}..{max(c['round_ratios']):.2f}"
      if c["pair"] == "same weights":
        note = f"first {c['tokens_agree_first']} of {c['new_tokens']}"
      else:
        paper = c.get("paper_ratio")
        note = f"paper {paper:.1f}x" if paper else "paper: not measured"
      lines.append(
        f"{c['bt_model'] + ' / ' + c['hf_model']:<30}{c['scenario']:<15}"
        f"{c['ratio']:>6.2f}x{spread:>14}{rounds:>14}  {note}"
      )
  return "\n".join(lines)


class TokensDisagree(RuntimeError):
  pass


def run(
  *,
  preset: str = "cpu",
  models: Optional[str] = None,
  scenarios: Optional[str] = None,
  batch_size: Optional[int] = None,
  repeats: Optional[int] = None,
  warmup: Optional[int] = None,
  dtype: Optional[str] = None,
  context: Optional[int] = None,
  hf_compile: str = "auto",
  cache_segments: int = 4,
  seed: int = 0,
  out: Optional[str] = None,
  profile: bool = False,
) -> dict:
  """Runs every scenario x model group; returns the report and writes it to
  `out` after every measurement ("complete" says whether all ran)."""
  defaults = PRESETS[preset]
  names = parse_models(models or defaults["models"])
  chosen = throughput.parse_scenarios(
    scenarios or defaults["scenarios"], "cpu" if preset == "cpu" else "paper"
  )
  if not chosen:
    raise cli.UserError(
      "no scenarios given; valid names are "
      f"{list(throughput.CPU_SCENARIOS if preset == 'cpu' else throughput.SCENARIOS)}"
      " or NAME=PROMPT/NEW"
    )
  for scenario, (prompt_len, new_tokens) in chosen.items():
    if prompt_len < 1 or new_tokens < 1:
      raise cli.UserError(
        f"scenario {scenario!r} needs a prompt and new tokens >= 1, got {prompt_len}/{new_tokens}"
      )
  batch = defaults["batch_size"] if batch_size is None else batch_size
  repeats = defaults["repeats"] if repeats is None else repeats
  warmup = defaults["warmup"] if warmup is None else warmup
  if batch < 1:
    raise cli.UserError(f"batch_size must be a positive integer, got {batch}")
  if repeats < 1:
    raise cli.UserError(f"repeats must be at least 1, got {repeats}")
  if context is not None and context < 2:
    raise cli.UserError(f"context must be at least 2, got {context}")
  dtype = dtype or defaults["dtype"]
  context = context or defaults["context"]
  configs = check_context(names, chosen, context)
  torch, transformers = import_torch()
  device = "cpu"
  if preset == "gpu":
    check_gpu(torch)
    device = "cuda"
  # ---- from here on, weights are made.

  groups: dict[str, list[str]] = {}
  for name in names:
    groups.setdefault(hf_partner(name), []).append(name)
  settings = dict(
    preset=preset,
    batch_size=batch,
    repeats=repeats,
    warmup=warmup,
    dtype=dtype,
    context=context,
    hf_compile=hf_compile,
    cache_segments=cache_segments,
    seed=seed,
    profile=profile,
  )
  environment = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "jax_backend": jax.default_backend(),
    "jax_device": str(jax.devices()[0].device_kind),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "torch_threads": torch.get_num_threads(),
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "processor": platform.processor(),
    "load_average_start": _load_average(),
  }
  start = time.perf_counter()
  results: list[dict] = []
  comparisons: list[dict] = []
  failures: list[str] = []

  def report(complete: bool) -> dict:
    value = {
      "preset": preset,
      "settings": settings,
      "environment": environment,
      "scenarios": chosen,
      "groups": groups,
      "results": results,
      "comparisons": comparisons,
      "token_failures": failures,
      "complete": complete,
      "load_average_end": _load_average(),
      "total_wall_s": time.perf_counter() - start,
    }
    if out:
      cli.write_json_atomic(out, value)
    return value

  with tempfile.TemporaryDirectory(prefix="peer_bench_") as scratch:
    for vanilla, members in groups.items():
      base = lifted(configs[vanilla], chosen, dtype)
      reference = BtJaxSide(vanilla, base, seed, cache_segments)
      folder = export_to_hf(base, reference.params, os.path.join(scratch, vanilla))
      hf = HfSide(vanilla, base, folder, device, hf_compile, seed)
      sides = [
        reference
        if name == vanilla
        else BtJaxSide(name, lifted(configs[name], chosen, dtype), seed, cache_segments)
        for name in members
      ]
      del reference
      for scenario, (prompt_len, new_tokens) in chosen.items():
        _run_group(
          sides,
          hf,
          scenario,
          prompt_len,
          new_tokens,
          batch,
          warmup,
          repeats,
          results,
          comparisons,
          failures,
          profile,
        )
        report(complete=False)
      del hf, sides
  final = report(complete=True)
  print(format_table(results, comparisons))
  print(
    f"total wall time {final['total_wall_s']:.1f} s; load average "
    f"{environment['load_average_start']} at the start, {final['load_average_end']} "
    f"at the end ({os.cpu_count()} CPUs)"
  )
  if failures:
    raise TokensDisagree("; ".join(failures))
  return final


def _load_average() -> Optional[list[float]]:
  with contextlib.suppress(OSError, AttributeError):
    return [round(x, 2) for x in os.getloadavg()]
  return None


def _run_group(
  sides,
  hf,
  scenario,
  prompt_len,
  new_tokens,
  batch,
  warmup,
  repeats,
  results,
  comparisons,
  failures,
  profile=False,
) -> None:
  """One scenario of one group: the bt_jax models and their transformers
  vanilla, warmed up, then `repeats` interleaved rounds (and with `profile`
  one more profiled call of each)."""
  for side in sides:
    side.prepare(batch, prompt_len, new_tokens)
  hf.prepare(batch, prompt_len, new_tokens)
  vanilla = next((s for s in sides if s.name == hf.name), None)
  bt_tokens, warm = {}, {}
  for side in sides:
    begin = time.perf_counter()
    for _ in range(max(warmup, 1)):
      bt_tokens[side.name] = np.asarray(side.call())
    warm[side.name] = time.perf_counter() - begin
  print(
    f"{scenario}: bt_jax warm-up " + ", ".join(f"{k} {v:.1f} s" for k, v in warm.items()),
    flush=True,
  )
  hf_tokens = hf.warm_up(warmup)
  print(
    f"{scenario}: transformers {hf.name} warm-up {hf.warmup_s}, runs {hf.mode}"
    + (f" (compile failed: {hf.compile_error})" if hf.compile_error else ""),
    flush=True,
  )
  times = {side.name: [] for side in sides}
  hf_times = []
  for round_ in range(repeats):
    for side in sides:
      begin = time.perf_counter()
      side.call()
      times[side.name].append(time.perf_counter() - begin)
    begin = time.perf_counter()
    hf.call()
    hf_times.append(time.perf_counter() - begin)
    print(
      f"{scenario} round {round_ + 1}/{repeats}: "
      + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items())
      + f", transformers {hf.name} "
      f"{hf_times[-1]:.2f} s",
      flush=True,
    )
  profiles = {}
  if profile:
    for side in sides:
      profiles[side.name] = op_profile.jax_op_profile(
        side.fn, side.params, side.tokens, side.pad, side.rng
      )
      print(
        op_profile.format_profile(
          f"{scenario}: bt_jax {side.name}, time per op", profiles[side.name]
        )
      )
    profiles["hf"] = op_profile.torch_op_profile(hf.call)
    print(
      op_profile.format_profile(
        f"{scenario}: transformers {hf.name} ({hf.mode}), self time per op", profiles["hf"]
      )
    )
  work = batch * new_tokens
  common = dict(
    scenario=scenario,
    prompt_len=prompt_len,
    new_tokens=new_tokens,
    batch_size=batch,
    dtype=str(sides[0].config.dtype),
    repeats=repeats,
  )
  hf_result = {
    "engine": "hf",
    "model": hf.name,
    **common,
    **summary(hf_times, work),
    "mode": hf.mode,
    "hf_compile_error": hf.compile_error,
    "hf_warmup_s": dict(hf.warmup_s),
    "hf_selection_s": dict(hf.selection_s),
    "hf_modes_agree_first": hf.modes_agree_first,
    "attn_implementation": "sdpa",
    "inference_mode": True,
  }
  if profile:
    hf_result["profile"] = profiles["hf"]
  for side in sides:
    bt = {
      "engine": "bt_jax",
      "model": side.name,
      "kind": side.config.kind,
      **common,
      **summary(times[side.name], work),
      "warmup_s": warm[side.name],
      "mode": f"jit, cache_segments={side.cache_segments}",
    }
    if profile:
      bt["profile"] = profiles[side.name]
    results.append(bt)
    pair = (
      "same weights"
      if side is vanilla
      else next(why for block, v, why in throughput.PAIRS if block == side.name and v == hf.name)
    )
    c = comparison(bt, hf_result, pair)
    if side is vanilla:
      agree = first_divergence(bt_tokens[side.name], hf_tokens)
      needed = min(MIN_AGREE, new_tokens)
      c.update(new_tokens=new_tokens, tokens_agree_first=agree, tokens_agree=agree >= needed)
      if agree < needed:
        failures.append(
          f"{side.name} {scenario}: bt_jax and transformers tokens differ at "
          f"position {agree}, before the first {needed}"
        )
    comparisons.append(c)
    print(
      f"{side.name} {scenario}: bt_jax {bt['tokens_per_s']:.1f} tokens/s, transformers "
      f"{hf.name} ({hf.mode}) {hf_result['tokens_per_s']:.1f}: {c['ratio']:.2f}x "
      f"({c['ratio_min']:.2f}..{c['ratio_max']:.2f})",
      flush=True,
    )
  results.append(hf_result)


def main(flag_values: flags.FlagValues) -> dict:
  args = flag_values
  return run(
    preset=args.preset,
    models=args.models,
    scenarios=args.scenarios,
    batch_size=args.batch_size,
    repeats=args.repeats,
    warmup=args.warmup,
    dtype=args.dtype,
    context=args.context,
    hf_compile=args.hf_compile,
    cache_segments=args.cache_segments,
    seed=args.seed,
    out=args.out,
    profile=args.profile,
  )


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_orbax_logs()
  cli.run(main, define_flags)
