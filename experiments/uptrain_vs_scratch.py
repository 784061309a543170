r"""Uptraining against training from scratch, on the quickstart pair.

Three runs of the training binary (`python -m bt_jax.train`), each in its own
workdir under --root:

1. `vanilla`: the quickstart vanilla model (gin_configs/runs/quickstart_vanilla.gin,
   4 x 128), --vanilla_steps steps;
2. `uptrained`: the quickstart Block Transformer with the projection embedder
   (gin_configs/runs/uptrain.gin), initialised from (1) as the Block
   Transformer paper's uptraining does (docs/convert.md), --block_steps steps;
3. `scratch`: the same block model and the same recipe (uptrain.gin with
   `INIT_FROM = None`): same steps, schedule, data order, tokenizer and
   eval batches, from a random init.

Both block runs read the vanilla run's tokenizer (`data.tokenizer_path`), so
their eval batches are the same tokens. Every run evaluates before its first
update (step 0), so the uptrained curve starts at the converted model's loss.
The budget compared is the block runs' own steps; the vanilla run's steps are
the uptrained model's head start, reported beside it.

    python -m experiments.uptrain_vs_scratch --root /tmp/uptrain_vs_scratch \
        [--vanilla_steps 600] [--block_steps 60] [--eval_every 10] \
        [--gin_param "data.corpus_max_bytes = 1000000"] \
        [--out /tmp/uptrain_vs_scratch.json] [--png docs/uptrain_vs_scratch.png]

Writes --out (JSON: the commands, each run's summary and eval curve) after
every run, the PNG of both block runs' eval curves (the vanilla source's
final eval loss as a reference line; its batches are packed without blocks,
so it is a reference, not the same measurement), and prints a table. A run
whose workdir already finished is not retrained (the binary resumes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import matplotlib
from absl import flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
from bt_jax import cli
from bt_jax.jsonl import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VANILLA_GIN = "runs/quickstart_vanilla.gin"
UPTRAIN_GIN = "runs/uptrain.gin"
RUNS = ("vanilla", "uptrained", "scratch")


def commands(
  root: str,
  vanilla_steps: int,
  block_steps: Optional[int],
  eval_every: int,
  eval_batches: Optional[int],
  extra: Sequence[str],
) -> dict[str, list[str]]:
  """The binary's command line of each run (module arguments after `python -m`)."""

  def train(gin_file, workdir, params):
    return [
      "bt_jax.train",
      f"--gin_file={gin_file}",
      f"--workdir={workdir}",
      *[f"--gin_param={p}" for p in [*params, *extra]],
    ]

  common = ["train.progress_bar = False"]
  if eval_batches is not None:
    common.append(f"train.eval_batches = {eval_batches}")
  vanilla = os.path.join(root, "vanilla")
  block = [
    *common,
    f"train.eval_every = {eval_every}",
    f"data.tokenizer_path = '{os.path.join(vanilla, 'tokenizer.json')}'",
  ]
  if block_steps is not None:  # the recipe's warmup is 10% of its steps
    block += [
      f"train.steps = {block_steps}",
      f"optimizer.warmup_steps = {max(1, block_steps // 10)}",
    ]
  return {
    # the source is evaluated at its start and end only (its curve is not compared)
    "vanilla": train(
      VANILLA_GIN,
      vanilla,
      [*common, f"train.steps = {vanilla_steps}", f"train.eval_every = {vanilla_steps}"],
    ),
    "uptrained": train(
      UPTRAIN_GIN, os.path.join(root, "uptrained"), [f"INIT_FROM = '{vanilla}'", *block]
    ),
    "scratch": train(UPTRAIN_GIN, os.path.join(root, "scratch"), ["INIT_FROM = None", *block]),
  }


def run_binary(args: Sequence[str], log_path: str) -> dict[str, Any]:
  """Runs `python -m <args>` (output to log_path); returns its printed summary."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  with open(log_path, "w", encoding="utf-8") as log:
    result = subprocess.run(
      [sys.executable, "-m", *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=log,
      text=True,
      check=False,
    )
  if result.returncode != 0:
    with open(log_path, encoding="utf-8") as f:
      tail = f.read()[-2000:]
    raise RuntimeError(
      f"`python -m {' '.join(args)}` exited with status {result.returncode}; "
      f"log {log_path}:\n{tail}"
    )
  return json.loads(result.stdout.strip().splitlines()[-1])


def eval_curve(workdir: str) -> list[tuple[int, float]]:
  return [
    (r["step"], r["eval_loss"])
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if "eval_loss" in r
  ]


def plot(results: dict[str, Any], path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, style in (("uptrained", "o-"), ("scratch", "s-")):
    if name in results["runs"]:
      steps, losses = zip(*results["runs"][name]["eval_curve"])
      ax.plot(steps, losses, style, markersize=3, label=f"{name} (block)")
  vanilla = results["runs"].get("vanilla")
  if vanilla is not None:
    ax.axhline(
      vanilla["summary"]["final_eval_loss"],
      color="gray",
      linestyle=":",
      label=f"vanilla source after {vanilla['summary']['step']} steps (reference)",
    )
  ax.set_xlabel("block-model step")
  ax.set_ylabel("eval loss (nats/token)")
  ax.set_title(
    "Quickstart Block Transformer: uptrained from the vanilla run vs from scratch",
    fontsize="medium",
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  cli.make_parent_dirs(path)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def table(results: dict[str, Any]) -> str:
  runs = results["runs"]
  lines = []
  if "uptrained" in runs and "scratch" in runs:
    up, sc = dict(runs["uptrained"]["eval_curve"]), dict(runs["scratch"]["eval_curve"])
    lines += ["| block step | uptrained eval loss | scratch eval loss |", "|---:|---:|---:|"]
    lines += [f"| {s} | {up[s]:.4f} | {sc[s]:.4f} |" for s in sorted(set(up) & set(sc))]
    lines.append("")
  lines += ["| run | steps | final eval loss | unigram | wall (s) |", "|---|---:|---:|---:|---:|"]
  for name in RUNS:
    if name in runs:
      s = runs[name]["summary"]
      lines.append(
        f"| {name} | {s['step']} | {s['final_eval_loss']:.4f} | "
        f"{s['unigram_entropy']:.4f} | {runs[name]['wall_s']:.0f} |"
      )
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string(
    "root",
    None,
    "Folder for the three workdirs (vanilla, uptrained, scratch) and their logs.",
    required=True,
    **fv,
  )
  flags.DEFINE_integer(
    "vanilla_steps",
    600,
    "Steps of the vanilla source run (the quickstart: 600).",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_integer(
    "block_steps",
    None,
    "Steps of each block run (default: uptrain.gin's, 60, "
    "about 10% of the quickstart); the warmup is 10% of them.",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_integer(
    "eval_every",
    10,
    "Steps between evals of the block runs (the vanilla run evaluates at its start and end).",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_integer(
    "eval_batches",
    None,
    "Eval batches of every run (default: the quickstart's, 8).",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_multi_string(
    "gin_param",
    [],
    "A gin binding for all three runs (e.g. 'data.corpus_max_bytes = 1000000').",
    **fv,
  )
  flags.DEFINE_string(
    "out", None, "JSON results (default: ROOT/results.json); its folder is created.", **fv
  )
  flags.DEFINE_string(
    "png", None, "PNG of the eval curves (default: ROOT/uptrain_vs_scratch.png).", **fv
  )


def main(flag_values: flags.FlagValues) -> dict[str, Any]:
  fv = flag_values
  root = os.path.abspath(fv.root)
  out = fv.out or os.path.join(root, "results.json")
  png = fv.png or os.path.join(root, "uptrain_vs_scratch.png")
  cmds = commands(
    root, fv.vanilla_steps, fv.block_steps, fv.eval_every, fv.eval_batches, fv.gin_param
  )
  results: dict[str, Any] = {
    "commands": {k: "python -m " + " ".join(v) for k, v in cmds.items()},
    "runs": {},
  }
  for name in RUNS:
    workdir = os.path.join(root, name)
    start = time.time()
    print(f"{name}: python -m {' '.join(cmds[name])}", flush=True)
    summary = run_binary(cmds[name], os.path.join(root, f"{name}.log"))
    results["runs"][name] = {
      "workdir": workdir,
      "summary": summary,
      "wall_s": time.time() - start,
      "eval_curve": eval_curve(workdir),
    }
    cli.write_json_atomic(out, results)
  up, sc = results["runs"]["uptrained"]["eval_curve"], results["runs"]["scratch"]["eval_curve"]
  results["uptrained_step0_eval_loss"] = up[0][1]
  results["final_eval_loss_gap"] = sc[-1][1] - up[-1][1]  # > 0: uptraining ends lower
  cli.write_json_atomic(out, results)
  plot(results, png)
  print(table(results))
  print(f"wrote {out} and {png}")
  return results


if __name__ == "__main__":
  cli.run(main, define_flags)
