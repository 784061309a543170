r"""Loss curves of one or more training runs, from their metrics.jsonl.

    python -m experiments.plot_training --workdir /tmp/qs                  # -> /tmp/qs/loss_curves.png
    python -m experiments.plot_training --workdir /tmp/qs --workdir /tmp/qs_vanilla \
        --out /tmp/quickstart_curves.png

Plots train loss (solid) and eval loss (markers) per step, and each run's
unigram baseline (dotted) when its summary.json has one. Labels are the
workdirs' base names, or `--label` values in the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from bt_jax.jsonl import read_jsonl  # pylint: disable=g-import-not-at-top,wrong-import-position

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_PNG = "loss_curves.png"


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"workdir {workdir!r} has no {METRICS_FILE}; expected a directory "
                            "written by `python -m bt_jax.train --workdir=...`")
  records = read_jsonl(path)
  if not records:
    raise ValueError(f"{path} has no records yet")
  return records


def read_summary(workdir: str) -> dict:
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def plot(workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None) -> str:
  if labels and len(labels) != len(workdirs):
    raise ValueError(f"got {len(labels)} labels for {len(workdirs)} workdirs")
  fig, ax = plt.subplots(figsize=(8, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, workdir in enumerate(workdirs):
    color = colors[i % len(colors)]
    label = labels[i] if labels else os.path.basename(os.path.normpath(workdir))
    records = read_metrics(workdir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
      ax.plot(*zip(*train), color=color, label=f"{label} train")
    if evals:
      ax.plot(*zip(*evals), "o--", color=color, markersize=4, label=f"{label} eval")
    unigram = read_summary(workdir).get("unigram_entropy")
    if unigram is not None:
      ax.axhline(unigram, color=color, linestyle=":", linewidth=1, label=f"{label} unigram")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Training loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="a training workdir (repeat to compare runs)")
  parser.add_argument("--label", action="append", default=None, help="legend label per workdir")
  parser.add_argument("--out", default=None,
                      help=f"PNG path (default: WORKDIR/{DEFAULT_PNG} of the first workdir)")
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir[0], DEFAULT_PNG)
  print(plot(args.workdir, out, args.label))
  return 0


if __name__ == "__main__":
  sys.exit(main())
