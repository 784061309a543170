r"""Tables and plots of a sweep run by `experiments.sweep`.

    python -m experiments.report --root /tmp/bl --out /tmp/bl_report
    python -m experiments.report --root /tmp/bl --out /tmp/bl_report --throughput   # + generation tokens/s

Reads ROOT/sweep.json (or, without it, every ROOT/<trial>/summary.json) and
writes to OUT:

    report.md               the table below, the plots, and where the numbers come from
    trials.csv              one row per trial: swept values, state, final eval loss,
                            eval loss at each position within the block, tokens/s, wall time
    loss_vs_<key>.png       final eval loss against each swept value (one line per
                            setting of the other swept keys, mean over seeds)
    pareto.png              final eval loss against throughput, the Pareto front joined
    loss_by_position.png    eval loss at each position within the block, one line per trial

Loss by position within the block is the training binary's own final eval
(`final_eval_loss_by_position` in summary.json: position t of a block of L_B
tokens is token t of the block; the Block Transformer paper's observation is
that the first tokens of a block, decoded from the context embedding alone,
have the highest loss). Vanilla trials have none.

Throughput: the training tokens/s of each run (median over logged windows,
from summary.json), and with --throughput the generation tokens/s of each
trial's model measured here with random weights by the protocol of
`experiments.throughput` (one prompt length, one generated length, a fixed
batch). The Pareto plot uses generation throughput when measured.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import flags, logging

from bt_jax import cli

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import sweep as sweep_lib  # pylint: disable=wrong-import-position

SEED_KEY = "seed"


@dataclasses.dataclass
class Row:
  name: str
  state: str
  swept: dict[str, Any]
  summary: dict[str, Any]
  workdir: str
  generation_tokens_per_s: Optional[float] = None

  @property
  def loss(self) -> Optional[float]:
    value = self.summary.get("final_eval_loss")
    return float(value) if value is not None and math.isfinite(value) else None

  @property
  def by_position(self) -> list[float]:
    return list(self.summary.get("final_eval_loss_by_position") or [])


def _short_key(key: str) -> str:
  return key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def read_rows(root: str) -> tuple[dict[str, Any], list[Row]]:
  """(sweep record, rows) from ROOT/sweep.json, or from the trial folders."""
  record = sweep_lib.read_json(os.path.join(root, sweep_lib.SWEEP_FILE))
  rows = []
  if record is not None:
    for t in record.get("trials", []):
      workdir = t.get("workdir") or os.path.join(root, t["name"])
      summary = sweep_lib.read_summary(workdir) or t.get("summary") or {}
      state = "done" if summary.get("final_eval_loss") is not None else t.get("state", "pending")
      rows.append(Row(t["name"], state, dict(t.get("swept", {})), summary, workdir))
  else:
    if not os.path.isdir(root):
      raise FileNotFoundError(f"--root {root!r} is not a directory")
    record = {"sweep": os.path.basename(os.path.normpath(root))}
    for name in sorted(os.listdir(root)):
      workdir = os.path.join(root, name)
      summary = sweep_lib.read_summary(workdir)
      if summary is not None:
        rows.append(Row(name, "done", {}, summary, workdir))
  if not rows:
    raise FileNotFoundError(
      f"no trials under {root!r}: expected {sweep_lib.SWEEP_FILE} written by "
      "`python -m experiments.sweep` or trial folders with summary.json"
    )
  return record, rows


def swept_keys(rows: Sequence[Row]) -> list[str]:
  keys: list[str] = []
  for row in rows:
    for key in row.swept:
      if key not in keys:
        keys.append(key)
  return keys


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.{digits}f}" if digits == 0 or abs(value) < 1e4 else f"{value:.4g}"
  return str(value)


def _value_label(key: str, value: Any) -> str:
  return sweep_lib._name_value(key, value)  # pylint: disable=protected-access


def table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
  """(header, rows of strings) shared by the CSV and the markdown table."""
  keys = swept_keys(rows)
  positions = max((len(r.by_position) for r in rows), default=0)
  header = [
    "trial",
    *[_short_key(k) if k != "gin_file" else k for k in keys],
    "state",
    "final_eval_loss",
    *[f"loss_pos{i}" for i in range(positions)],
    "num_params",
    "train_tokens_per_s",
  ]
  if any(r.generation_tokens_per_s is not None for r in rows):
    header.append("generation_tokens_per_s")
  header.append("wall_s")
  out = []
  for r in rows:
    by_pos = r.by_position + [None] * (positions - len(r.by_position))
    line = [
      r.name,
      *[_value_label(k, r.swept[k]) if k in r.swept else "" for k in keys],
      r.state,
      _fmt(r.loss),
      *[_fmt(x) for x in by_pos],
      _fmt(r.summary.get("num_params")),
      _fmt(r.summary.get("tokens_per_s"), 0),
    ]
    if "generation_tokens_per_s" in header:
      line.append(_fmt(r.generation_tokens_per_s, 0))
    line.append(_fmt(r.summary.get("wall_s"), 0))
    out.append(line)
  return header, out


def write_csv(path: str, header: list[str], lines: list[list[str]]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(lines)


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
  text = io.StringIO()
  text.write("| " + " | ".join(header) + " |\n")
  text.write("|" + "|".join("---" for _ in header) + "|\n")
  for line in lines:
    text.write("| " + " | ".join(x.replace("|", "/") for x in line) + " |\n")
  return text.getvalue()


# ---------------------------------------------------------------------------
# Plots


def plot_loss_vs(rows: Sequence[Row], key: str, path: str) -> bool:
  """Final eval loss against the values of `key` (in sweep order), one line per
  setting of the other swept keys; seeds averaged, each seed a dot."""
  done = [r for r in rows if r.loss is not None and key in r.swept]
  if not done:
    return False
  values = list(dict.fromkeys(_value_label(key, r.swept[key]) for r in done))
  others = [
    k for k in swept_keys(done) if k != key and _short_key(k) != SEED_KEY and k != "train.seed"
  ]
  groups: dict[str, dict[str, list[float]]] = {}
  for r in done:
    label = (
      ", ".join(f"{_short_key(k)}={_value_label(k, r.swept.get(k))}" for k in others) or "loss"
    )
    groups.setdefault(label, {}).setdefault(_value_label(key, r.swept[key]), []).append(r.loss)
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, by_value in groups.items():
    xs = [values.index(v) for v in values if v in by_value]
    means = [sum(by_value[v]) / len(by_value[v]) for v in values if v in by_value]
    ax.plot(xs, means, marker="o", label=label)
    for v, losses in by_value.items():
      if len(losses) > 1:
        ax.scatter([values.index(v)] * len(losses), losses, s=10, alpha=0.5, color="gray")
  ax.set_xticks(range(len(values)), values, rotation=20 if max(map(len, values)) > 6 else 0)
  ax.set_xlabel(_short_key(key))
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title(f"final eval loss vs {_short_key(key)}")
  ax.grid(alpha=0.3)
  if len(groups) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the (throughput, loss) points no other point beats on both
  (higher or equal throughput and lower or equal loss, one strictly), by throughput."""
  front = []
  for i, (tp, loss) in enumerate(points):
    dominated = any(
      tp2 >= tp and l2 <= loss and (tp2 > tp or l2 < loss)
      for j, (tp2, l2) in enumerate(points)
      if j != i
    )
    if not dominated:
      front.append(i)
  return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: Sequence[Row], path: str) -> Optional[str]:
  use_generation = any(r.generation_tokens_per_s for r in rows)
  metric = "generation tokens/s" if use_generation else "training tokens/s"
  pts, names = [], []
  for r in rows:
    tp = r.generation_tokens_per_s if use_generation else r.summary.get("tokens_per_s")
    if r.loss is not None and tp:
      pts.append((float(tp), r.loss))
      names.append(r.name)
  if not pts:
    return None
  front = pareto_front(pts)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
  ax.plot(
    [pts[i][0] for i in front],
    [pts[i][1] for i in front],
    color="tab:red",
    marker="o",
    markerfacecolor="none",
    markersize=11,
    label="Pareto front",
  )
  for (tp, loss), name in zip(pts, names):
    ax.annotate(name, (tp, loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel(metric)
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title("loss vs throughput")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return metric


def plot_loss_by_position(rows: Sequence[Row], path: str) -> bool:
  with_positions = [r for r in rows if r.by_position]
  if not with_positions:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in with_positions:
    ax.plot(range(len(r.by_position)), r.by_position, marker="o", label=r.name)
  longest = max(len(r.by_position) for r in with_positions)
  ax.set_xticks(range(longest))
  ax.set_xlabel("position within the block")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title("eval loss by position within the block")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# ---------------------------------------------------------------------------
# Generation throughput (random weights, experiments.throughput's protocol)


def generation_tokens_per_s(
  workdir: str, *, prompt_len: int, new_tokens: int, batch: int, repeats: int = 3, seed: int = 0
) -> float:
  """Generated tokens/s of the model of a trained workdir, with random weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bt_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from bt_jax.config import BlockConfig  # pylint: disable=g-import-not-at-top
  from bt_jax.inference import generate_fn, num_steps_for  # pylint: disable=g-import-not-at-top
  from bt_jax.models import build_model, init_params  # pylint: disable=g-import-not-at-top
  from experiments import throughput  # pylint: disable=g-import-not-at-top

  config = checkpointing.load_model_config(workdir)
  block_len = config.block_len if isinstance(config, BlockConfig) else 1
  needed = (-(-prompt_len // block_len) + num_steps_for(config, new_tokens)) * block_len
  config = dataclasses.replace(config, max_len=max(config.max_len, needed))
  model = build_model(config)
  params = init_params(model, jax.random.key(seed))
  fn = generate_fn(model, new_tokens)  # greedy, EOS disabled
  tokens, pad = throughput.random_prompts(config, batch, prompt_len, np.random.default_rng(seed))
  rng = jax.random.key(seed)
  jax.block_until_ready(fn(params, tokens, pad, rng))  # compile + warm-up
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(params, tokens, pad, rng))
  return batch * new_tokens * repeats / (time.perf_counter() - start)


# ---------------------------------------------------------------------------


def build_report(root: str, out: str, *, throughput: Optional[dict[str, int]] = None) -> str:
  """Writes report.md, trials.csv and the PNGs to `out`; returns the report path."""
  record, rows = read_rows(root)
  os.makedirs(out, exist_ok=True)
  if throughput:
    for r in rows:
      if r.state == "done":
        r.generation_tokens_per_s = generation_tokens_per_s(r.workdir, **throughput)
  header, lines = table(rows)
  write_csv(os.path.join(out, "trials.csv"), header, lines)
  plots = []
  for key in swept_keys(rows):
    if _short_key(key) == SEED_KEY or key == "train.seed":
      continue
    name = f"loss_vs_{_short_key(key)}.png"
    if plot_loss_vs(rows, key, os.path.join(out, name)):
      plots.append((f"final eval loss vs {_short_key(key)}", name))
  metric = plot_pareto(rows, os.path.join(out, "pareto.png"))
  if metric:
    plots.append((f"final eval loss vs {metric}, Pareto front in red", "pareto.png"))
  if plot_loss_by_position(rows, os.path.join(out, "loss_by_position.png")):
    plots.append(("eval loss by position within the block", "loss_by_position.png"))

  text = io.StringIO()
  title = record.get("sweep", "sweep")
  text.write(f"# Sweep {title}\n\n")
  if record.get("description"):
    text.write(f"{record['description']}. ")
  text.write(
    f"Scale {record.get('scale', '?')}, sweep file {record.get('source', '?')}, "
    f"{len(rows)} trials under `{root}`.\n\n"
  )
  text.write(markdown_table(header, lines))
  text.write(
    "\nfinal_eval_loss: mean next-token loss (nats) on the validation batches at the last step; "
    "loss_posI: the same at position I within the block; train_tokens_per_s: median training "
    "throughput; wall_s: the binary's wall time of its last attempt.\n"
  )
  if throughput:
    text.write(
      f"generation_tokens_per_s: random weights, prompt {throughput['prompt_len']}, "
      f"{throughput['new_tokens']} generated, batch {throughput['batch']}, on "
      f"{_device_name()}.\n"
    )
  for caption, name in plots:
    text.write(f"\n![{caption}]({name})\n")
  path = os.path.join(out, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.getvalue())
  return path


def _device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return f"{jax.device_count()} x {device.device_kind}"


def define_flags() -> None:
  flags.DEFINE_string("root", None, "Sweep directory (experiments.sweep --root).")
  flags.DEFINE_string("out", None, "Report directory: report.md, trials.csv, PNGs.")
  flags.DEFINE_bool(
    "throughput", False, "Measure each trial's generation tokens/s (random weights)."
  )
  flags.DEFINE_integer("prompt_len", 16, "Throughput: prompt tokens.")
  flags.DEFINE_integer("new_tokens", 64, "Throughput: generated tokens.")
  flags.DEFINE_integer("batch_size", 8, "Throughput: prompts per generate call.")


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.root or not FLAGS.out:
    raise cli.UserError("--root and --out are required")
  throughput = (
    dict(prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens, batch=FLAGS.batch_size)
    if FLAGS.throughput
    else None
  )
  try:
    path = build_report(FLAGS.root, FLAGS.out, throughput=throughput)
  except FileNotFoundError as e:  # one line, exit status 2 (bt_jax.cli)
    raise cli.UserError(str(e)) from e
  logging.info("report in %s", path)
  print(path)


if __name__ == "__main__":
  define_flags()
  cli.run(lambda _: main([sys.argv[0]]))  # --help exits 0; user errors: one line, status 2
