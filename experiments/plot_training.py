r"""Loss curves of one or more training runs, from their metrics.jsonl.

    python -m experiments.plot_training --workdir /tmp/qs                  # -> /tmp/qs/loss_curves.png
    python -m experiments.plot_training --workdir /tmp/qs --workdir /tmp/qs_vanilla \
        --out /tmp/quickstart_curves.png

Plots train loss (solid) and eval loss (markers) per step, and each run's
unigram baseline (dotted) when its summary.json has one. A ReDrafter run's
folder (`python -m bt_jax.train_drafter`, e.g. /tmp/qs_vanilla/drafter) gives
its loss and, in a second panel, the top-1 accuracy of each draft step.
Labels are the workdirs' base names, or `--label` values in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import matplotlib
from absl import flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
from bt_jax import cli
from bt_jax.jsonl import read_jsonl
# pylint: enable=g-import-not-at-top,wrong-import-position

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_PNG = "loss_curves.png"


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise cli.UserError(
      f"--workdir {workdir!r} has no {METRICS_FILE}; give a directory "
      "written by `python -m bt_jax.train` or `bt_jax.train_drafter`"
    )
  records = read_jsonl(path)
  if not records:
    raise cli.UserError(f"{path} has no records yet; plot once the run has logged a step")
  return records


def read_summary(workdir: str) -> dict:
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def series(records: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
  """The curves of one run: (step, value) per name. A model run has
  train_loss / eval_loss; a ReDrafter run (bt_jax.train_drafter) has loss
  (the sum over draft steps) and acc_<i>, the top-1 accuracy of draft step i."""
  out: dict[str, list[tuple[int, float]]] = {}
  for r in records:
    for key in ("train_loss", "eval_loss", "loss"):
      if key in r:
        out.setdefault(key, []).append((r["step"], r[key]))
    for i, acc in enumerate(r.get("acc_i", [])):
      out.setdefault(f"acc_{i}", []).append((r["step"], acc))
  return out


def plot(workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None) -> str:
  if labels and len(labels) != len(workdirs):
    raise cli.UserError(
      f"got {len(labels)} --label values for {len(workdirs)} --workdir "
      "values; give one label per workdir, or none"
    )
  runs = [(workdir, series(read_metrics(workdir))) for workdir in workdirs]
  drafter_runs = any(any(k.startswith("acc_") for k in curves) for _, curves in runs)
  fig, axes = plt.subplots(
    1, 2 if drafter_runs else 1, figsize=(13 if drafter_runs else 8, 5), squeeze=False
  )
  ax = axes[0, 0]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (workdir, curves) in enumerate(runs):
    color = colors[i % len(colors)]
    label = labels[i] if labels else os.path.basename(os.path.normpath(workdir))
    if "train_loss" in curves:
      ax.plot(*zip(*curves["train_loss"]), color=color, label=f"{label} train")
    if "eval_loss" in curves:
      ax.plot(*zip(*curves["eval_loss"]), "o--", color=color, markersize=4, label=f"{label} eval")
    if "loss" in curves:
      ax.plot(*zip(*curves["loss"]), color=color, label=f"{label} drafter (sum over draft steps)")
    unigram = read_summary(workdir).get("unigram_entropy")
    if unigram is not None:
      ax.axhline(unigram, color=color, linestyle=":", linewidth=1, label=f"{label} unigram")
    accuracy = sorted((k for k in curves if k.startswith("acc_")), key=lambda k: int(k[4:]))
    for j, key in enumerate(accuracy):
      axes[0, 1].plot(
        *zip(*curves[key]),
        color=color,
        alpha=1.0 - 0.6 * j / max(len(accuracy), 1),
        label=f"{label} draft step {int(key[4:]) + 1}",
      )
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Training loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  if drafter_runs:
    acc = axes[0, 1]
    acc.set_xlabel("step")
    acc.set_ylabel("top-1 accuracy")
    acc.set_ylim(0, 1)
    acc.set_title("Draft head: accuracy per draft step")
    acc.grid(alpha=0.3)
    acc.legend(fontsize="small")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_multi_string(
    "workdir",
    None,
    "A training workdir or drafter folder (repeat to compare runs).",
    required=True,
    **fv,
  )
  flags.DEFINE_multi_string("label", None, "Legend label per workdir, in the same order.", **fv)
  flags.DEFINE_string(
    "out",
    None,
    f"PNG path (default: WORKDIR/{DEFAULT_PNG} of the first workdir); its folder is created.",
    **fv,
  )


def main(flag_values: flags.FlagValues) -> str:
  workdirs = flag_values.workdir
  out = flag_values.out or os.path.join(workdirs[0], DEFAULT_PNG)
  path = plot(workdirs, out, flag_values.label)
  print(path)
  return path


if __name__ == "__main__":
  cli.run(main, define_flags)
