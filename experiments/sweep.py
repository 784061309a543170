r"""Hyperparameter sweeps of `bt_jax.train`, one Ray job per trial.

    python -m experiments.sweep --sweep sweeps/block_length.gin --root /tmp/bl --dry_run
    python -m experiments.sweep --sweep sweeps/block_length.gin --root /tmp/bl --max_concurrent 2
    python -m experiments.sweep --sweep sweeps/block_length.gin --scale paper --root gs://... \
        --ray_address auto --tpu_type v4-16

A sweep is a gin file (gin_configs/sweeps/*.gin) that binds `sweep.*`:

    sweep.name = "block_length"
    tiny/sweep.base_gin_files = ["runs/quickstart.gin"]      # --scale tiny
    paper/sweep.base_gin_files = ["experiments/block_b4_85m.gin"]
    sweep.base_bindings = ["train.steps = 100"]              # every trial
    sweep.product = {"BlockConfig.block_len": [1, 2, 4, 8]}  # cartesian product
    sweep.zip = {}                                           # swept together, equal lengths
    sweep.seeds = [0, 1]                                     # optional, bound to sweep.seed_binding

`--scale NAME` parses the file inside the gin scope NAME: `tiny/sweep.x` and
`paper/sweep.x` override the unscoped `sweep.x`. The trials are the product
of `product`, times the rows of `zip`, times `seeds`. The key `gin_file` in
`product` / `zip` sweeps an extra gin file appended to the base files (e.g.
a block model against a vanilla one). Every other key is a gin binding passed
to the binary as `--gin_param="KEY = VALUE"` (values are Python literals).

Trial names come from the swept values only (`block_len=4`,
`embedder=lookup,token_decoder=prefix`, `...,seed=1`), so they are stable
across reruns; a trial's workdir is ROOT/<name>. Every trial's config is
built (gin parsed, model and train configs checked) before anything starts:
an unknown binding, an empty grid, zip lists of unequal lengths or two trials
with one name stop the sweep with one error.

Running: each trial is one Ray actor (`experiments.ray_trials.TrialRunner`)
that starts `python -m bt_jax.train` on `num_hosts` hosts (one process per
host, `jax.distributed` with the coordinator on host 0) and reports the exit
codes. A trial with summary.json is done and skipped; a trial that failed or
was preempted (no summary.json) is retried up to --max_retries times and
resumes from its own checkpoints. SIGINT / SIGTERM stop every trial with a
checkpoint; rerunning the same command continues. Progress is logged as
done / running / pending / failed with the best eval loss so far, and
ROOT/sweep.json holds each trial's state, bindings and summary.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import flags, logging

from bt_jax import cli
import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin_configs"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
SWEEP_FILE = "sweep.json"
GIN_FILE_KEY = "gin_file"
DEFAULT_SCALES = ("tiny", "paper")


class SweepError(ValueError):
  """A sweep file that cannot run: the message names the file and what is wrong."""


# ---------------------------------------------------------------------------
# The sweep file


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """What a sweep file binds, for one scale."""

  name: str
  scale: str
  base_gin_files: tuple[str, ...]
  base_bindings: tuple[str, ...] = ()
  product: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  zip: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  seeds: tuple[int, ...] = ()
  seed_binding: str = "train.seed"
  num_hosts: int = 1
  description: str = ""


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of the binary: its name, gin files, bindings and workdir."""

  name: str
  swept: dict[str, Any]  # the swept keys and this trial's values (the name's source)
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]  # base bindings, then the swept ones
  workdir: str
  num_hosts: int = 1

  def command(
    self, python: str = sys.executable, *, coordinator: Optional[str] = None, process_id: int = 0
  ) -> list[str]:
    """The binary's command line (for host `process_id` of a multi-host trial)."""
    args = [
      python,
      "-m",
      "bt_jax.train",
      *[f"--gin_file={f}" for f in self.gin_files],
      *[f"--gin_param={b}" for b in self.bindings],
      f"--workdir={self.workdir}",
    ]
    if self.num_hosts > 1:
      if coordinator is None:
        raise ValueError(
          f"trial {self.name!r} runs on {self.num_hosts} hosts: it needs a coordinator"
        )
      args += [
        f"--coordinator_address={coordinator}",
        f"--num_processes={self.num_hosts}",
        f"--process_id={process_id}",
      ]
    return args

  def to_json(self) -> dict[str, Any]:
    return {
      "name": self.name,
      "swept": self.swept,
      "gin_files": list(self.gin_files),
      "bindings": list(self.bindings),
      "workdir": self.workdir,
      "num_hosts": self.num_hosts,
    }


@gin.configurable("sweep")
def _sweep_bindings(
  name=gin.REQUIRED,
  base_gin_files=gin.REQUIRED,
  base_bindings=(),
  product=None,
  zip=None,
  seeds=None,
  seed_binding="train.seed",
  num_hosts=1,
  scales=DEFAULT_SCALES,
  description="",
):  # pylint: disable=redefined-builtin
  return dict(
    name=name,
    base_gin_files=base_gin_files,
    base_bindings=base_bindings,
    product=product,
    zip=zip,
    seeds=seeds,
    seed_binding=seed_binding,
    num_hosts=num_hosts,
    scales=scales,
    description=description,
  )


def resolve_sweep_file(path: str) -> str:
  """`path` as given, or under gin_configs/ (sweeps/x.gin), or with .gin added."""
  candidates = [path, str(GIN_DIR / path), str(GIN_DIR / "sweeps" / path)]
  candidates += [c + ".gin" for c in candidates if not c.endswith(".gin")]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  shipped = sorted(str(p.relative_to(GIN_DIR)) for p in (GIN_DIR / "sweeps").glob("*.gin"))
  raise SweepError(
    f"sweep file {path!r} not found (also looked under {GIN_DIR}); shipped sweeps: {shipped}"
  )


def load_sweep(path: str, scale: str = "tiny") -> SweepSpec:
  """Parses a sweep file for one scale (the gin scope `scale`)."""
  resolved = resolve_sweep_file(path)
  gin.clear_config()
  try:
    gin.parse_config_file(resolved)
    with gin.config_scope(scale):
      raw = _sweep_bindings()
  except Exception as e:  # gin raises several exception types
    raise SweepError(f"sweep file {path!r}: {e}") from e
  finally:
    gin.clear_config()
  scales = tuple(raw.pop("scales"))
  if scale not in scales:
    raise SweepError(f"sweep file {path!r} has no scale {scale!r}; its scales are {list(scales)}")

  def as_grid(field):
    value = raw[field] or {}
    if not isinstance(value, dict):
      raise SweepError(
        f"sweep file {path!r}: sweep.{field} must be a dict of binding -> list of "
        f"values, got {value!r}"
      )
    for key, values in value.items():
      if not isinstance(values, (list, tuple)):
        raise SweepError(
          f"sweep file {path!r}: sweep.{field}[{key!r}] must be a list of values, got {values!r}"
        )
    return {str(k): list(v) for k, v in value.items()}

  if isinstance(raw["base_gin_files"], str) or isinstance(raw["base_bindings"], str):
    raise SweepError(f"sweep file {path!r}: sweep.base_gin_files and sweep.base_bindings are lists")
  if not isinstance(raw["num_hosts"], int) or raw["num_hosts"] < 1:
    raise SweepError(
      f"sweep file {path!r}: sweep.num_hosts must be a positive integer, got {raw['num_hosts']!r}"
    )
  return SweepSpec(
    name=str(raw["name"]),
    scale=scale,
    base_gin_files=tuple(raw["base_gin_files"]),
    base_bindings=tuple(raw["base_bindings"]),
    product=as_grid("product"),
    zip=as_grid("zip"),
    seeds=tuple(raw["seeds"] or ()),
    seed_binding=raw["seed_binding"],
    num_hosts=raw["num_hosts"],
    description=raw["description"],
  )


# ---------------------------------------------------------------------------
# Grid expansion and names


def format_value(value: Any) -> str:
  """A gin literal for `value` (strings quoted)."""
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, (bool, int, float, type(None), list, tuple, dict)):
    text = repr(value)
    ast.literal_eval(text)  # only literals: gin and the binary read them back as written
    return text
  raise SweepError(f"sweep value {value!r} is not a Python literal")


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Name part of each swept key: the parameter name when that is unambiguous."""

  def short(key):
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]

  shorts = [short(k) for k in keys]
  return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts)}


def _name_value(key: str, value: Any) -> str:
  if key == GIN_FILE_KEY:
    files = [value] if isinstance(value, str) else list(value)
    text = "+".join(pathlib.PurePath(f).stem for f in files)
  elif isinstance(value, float):
    text = f"{value:g}"
  else:
    text = str(value)
  return text


def trial_name(swept: dict[str, Any], short_keys: dict[str, str]) -> str:
  parts = [f"{short_keys[k]}={_name_value(k, v)}" for k, v in swept.items()]
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"


def expand(spec: SweepSpec, root: str, source: str = "<sweep>") -> list[Trial]:
  """The trials of a sweep, in a stable order; raises SweepError on a bad grid."""
  overlap = set(spec.product) & set(spec.zip)
  if overlap:
    raise SweepError(
      f"sweep file {source!r}: {sorted(overlap)} in both sweep.product and sweep.zip"
    )
  if spec.seeds and spec.seed_binding in {**spec.product, **spec.zip}:
    raise SweepError(
      f"sweep file {source!r}: {spec.seed_binding!r} is swept and also set by sweep.seeds"
    )
  lengths = {k: len(v) for k, v in spec.zip.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(
      f"sweep file {source!r}: the lists of sweep.zip must have equal lengths, got {lengths}"
    )
  empty = [k for k, v in {**spec.product, **spec.zip}.items() if not v]
  if empty or not (spec.product or spec.zip or spec.seeds):
    raise SweepError(
      f"sweep file {source!r}: the grid is empty ({'no values for ' + str(empty) if empty else 'bind sweep.product, sweep.zip or sweep.seeds'})"
    )

  product_rows = [
    dict(zip(spec.product, values)) for values in itertools.product(*spec.product.values())
  ]
  zip_rows = [dict(zip(spec.zip, values)) for values in zip(*spec.zip.values())] or [{}]
  seed_rows = [{spec.seed_binding: s} for s in spec.seeds] or [{}]
  keys = [*spec.product, *spec.zip, *([spec.seed_binding] if spec.seeds else [])]
  shorts = _short_keys(keys)
  if spec.seeds:
    shorts[spec.seed_binding] = "seed"
  trials, seen = [], {}
  for p, z, s in itertools.product(product_rows, zip_rows, seed_rows):
    swept = {**p, **z, **s}
    name = trial_name(swept, shorts)
    if name in seen:
      raise SweepError(
        f"sweep file {source!r}: trials {seen[name]} and {swept} have the same name "
        f"{name!r}; make the swept values distinct"
      )
    seen[name] = swept
    extra_files = swept.get(GIN_FILE_KEY, ())
    extra_files = (extra_files,) if isinstance(extra_files, str) else tuple(extra_files)
    bindings = tuple(spec.base_bindings) + tuple(
      f"{k} = {format_value(v)}" for k, v in swept.items() if k != GIN_FILE_KEY
    )
    trials.append(
      Trial(
        name=name,
        swept=swept,
        gin_files=tuple(spec.base_gin_files) + extra_files,
        bindings=bindings,
        workdir=os.path.join(root, name),
        num_hosts=spec.num_hosts,
      )
    )
  return trials


def validate(trials: Sequence[Trial], source: str = "<sweep>") -> None:
  """Builds every trial's model and train config (gin parsed as the binary parses it).

  Raises SweepError for the first trial that the binary would reject."""
  from bt_jax import train  # pylint: disable=g-import-not-at-top  (imports jax)

  try:
    for trial in trials:
      try:
        train.configs_from_gin(list(trial.gin_files), list(trial.bindings))
      except (ValueError, FileNotFoundError) as e:
        raise SweepError(f"sweep file {source!r}: trial {trial.name!r} is invalid: {e}") from None
  finally:
    gin.clear_config()


def load_trials(
  path: str,
  root: str,
  scale: str = "tiny",
  *,
  num_hosts: Optional[int] = None,
  extra_bindings: Sequence[str] = (),
  check: bool = True,
) -> tuple[SweepSpec, list[Trial]]:
  """The sweep file's trials under `root`, checked before anything runs.

  `extra_bindings` follow the file's base bindings in every trial (a data
  directory, a mesh); they do not enter the trial names."""
  spec = load_sweep(path, scale)
  if num_hosts is not None:
    spec = dataclasses.replace(spec, num_hosts=num_hosts)
  if extra_bindings:
    spec = dataclasses.replace(spec, base_bindings=spec.base_bindings + tuple(extra_bindings))
  trials = expand(spec, root, path)
  if check:
    validate(trials, path)
  return spec, trials


# ---------------------------------------------------------------------------
# Trial state on disk


def read_json(path: str) -> Optional[dict[str, Any]]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_summary(workdir: str) -> Optional[dict[str, Any]]:
  """The binary's summary.json: written only when a run finished (never when stopped)."""
  return read_json(os.path.join(workdir, SUMMARY_FILE))


def latest_eval_loss(workdir: str) -> Optional[float]:
  """The last eval loss in a (running) trial's metrics.jsonl."""
  try:
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
      lines = f.readlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if "eval_loss" in record:
      return float(record["eval_loss"])
  return None


def _write_text_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


@dataclasses.dataclass
class TrialState:
  trial: Trial
  state: str = "pending"  # pending | running | done | failed | stopped
  attempts: int = 0  # starts in this invocation of the sweep
  returncodes: list[Any] = dataclasses.field(default_factory=list)
  errors: list[str] = dataclasses.field(default_factory=list)
  started: Optional[float] = None
  wall_s: float = 0.0  # summed over this invocation's attempts
  skipped: bool = False  # done before this invocation started

  def to_json(self) -> dict[str, Any]:
    return {
      **self.trial.to_json(),
      "state": self.state,
      "attempts": self.attempts,
      "returncodes": self.returncodes,
      "errors": self.errors,
      "skipped": self.skipped,
      "sweep_wall_s": self.wall_s,
      "summary": read_summary(self.trial.workdir),
    }


def write_sweep_json(root: str, spec: SweepSpec, source: str, states: Sequence[TrialState]) -> str:
  path = os.path.join(root, SWEEP_FILE)
  record = {
    "sweep": spec.name,
    "source": source,
    "scale": spec.scale,
    "description": spec.description,
    "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    "counts": counts(states),
    "trials": [s.to_json() for s in states],
  }
  _write_text_atomic(path, json.dumps(record, indent=2) + "\n")
  return path


def counts(states: Sequence[TrialState]) -> dict[str, int]:
  out = {k: 0 for k in ("done", "running", "pending", "failed", "stopped")}
  for s in states:
    out[s.state] += 1
  return out


def best_eval_loss(states: Sequence[TrialState]) -> Optional[tuple[float, str]]:
  """(loss, trial) of the lowest eval loss so far: finished trials' final loss,
  running trials' latest logged eval."""
  best = None
  for s in states:
    if s.state == "done":
      loss = (read_summary(s.trial.workdir) or {}).get("final_eval_loss")
    elif s.state == "running":
      loss = latest_eval_loss(s.trial.workdir)
    else:
      loss = None
    if loss is not None and math.isfinite(loss) and (best is None or loss < best[0]):
      best = (loss, s.trial.name)
  return best


def progress_line(spec: SweepSpec, states: Sequence[TrialState]) -> str:
  c = counts(states)
  best = best_eval_loss(states)
  text = (
    f"sweep {spec.name}: {c['done']} done, {c['running']} running, {c['pending']} pending, "
    f"{c['failed']} failed"
  )
  if c["stopped"]:
    text += f", {c['stopped']} stopped"
  return text + (f"; best eval loss {best[0]:.4f} ({best[1]})" if best else "")


# ---------------------------------------------------------------------------
# Running


@dataclasses.dataclass(frozen=True)
class RunOptions:
  max_concurrent: int = 1
  max_retries: int = 1
  resources_per_host: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1})
  tpu_type: Optional[str] = None  # e.g. "v4-16": hosts on one slice via "TPU-v4-16-head"
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  working_dir: str = str(REPO_ROOT)
  python: str = sys.executable
  progress_every_s: float = 30.0
  niceness: Optional[int] = dataclasses.field(
    default_factory=lambda: os.getpriority(os.PRIO_PROCESS, 0)
  )


def parse_resources(text: str) -> dict[str, float]:
  """'CPU=1,GPU=1' or a JSON object -> {"CPU": 1.0, "GPU": 1.0} (Ray resources per host)."""
  text = text.strip()
  if not text:
    return {}
  try:
    if text.startswith("{"):
      parsed = json.loads(text)
    else:
      parsed = dict(item.split("=", 1) for item in text.split(","))
    return {str(k).strip(): float(v) for k, v in parsed.items()}
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"--resources_per_trial={text!r}: expected 'CPU=1,GPU=1' or a JSON object "
      f"of Ray resource -> amount ({e})"
    ) from None


class _StopSignal:
  """SIGINT / SIGTERM to the sweep: stop the trials with a checkpoint, then exit."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:  # a second signal: stop waiting
      raise KeyboardInterrupt
    self.requested = True
    logging.warning(
      "signal %d: stopping every running trial with a checkpoint "
      "(rerun the same command to continue)",
      signum,
    )

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_sweep(
  spec: SweepSpec, trials: Sequence[Trial], root: str, options: RunOptions, source: str = "<sweep>"
) -> list[TrialState]:
  """Runs the unfinished trials on the connected Ray cluster (`ray.init` done by the caller).

  Returns every trial's state; ROOT/sweep.json is rewritten at each change."""
  from experiments import ray_trials  # pylint: disable=g-import-not-at-top  (imports ray)

  os.makedirs(root, exist_ok=True)
  states = [TrialState(t) for t in trials]
  for s in states:
    if read_summary(s.trial.workdir) is not None:
      s.state, s.skipped = "done", True
  skipped = sum(s.skipped for s in states)
  if skipped:
    logging.info("%d of %d trials already finished (summary.json): skipped", skipped, len(states))
  write_sweep_json(root, spec, source, states)
  running: dict[str, tuple[TrialState, Any, Any]] = {}  # name -> (state, runner actor, result ref)
  last_progress = 0.0
  asked_to_stop: set[str] = set()

  def launch(s: TrialState):
    os.makedirs(s.trial.workdir, exist_ok=True)
    s.state, s.attempts, s.started = "running", s.attempts + 1, time.time()
    runner = ray_trials.TrialRunner.options(max_concurrency=2, num_cpus=0).remote()
    ref = runner.run.remote(
      dataclasses.asdict(s.trial),
      options.resources_per_host,
      options.tpu_type,
      options.env,
      options.working_dir,
      options.python,
      s.attempts,
      options.niceness,
    )
    running[s.trial.name] = (s, runner, ref)
    logging.info("trial %s: attempt %d started (%s)", s.trial.name, s.attempts, s.trial.workdir)

  def finish(name: str, result: dict[str, Any], stopping: bool):
    s, runner, _ = running.pop(name)
    ray_trials.kill(runner)
    s.wall_s += time.time() - (s.started or time.time())
    s.returncodes.append(result.get("returncodes"))
    if result.get("error"):
      s.errors.append(result["error"])
    if read_summary(s.trial.workdir) is not None:
      s.state = "done"
      logging.info(
        "trial %s: done, final eval loss %.4f",
        name,
        read_summary(s.trial.workdir).get("final_eval_loss", float("nan")),
      )
    elif stopping:
      s.state = "stopped"
    elif s.attempts <= options.max_retries:
      s.state = "pending"
      logging.warning(
        "trial %s: attempt %d ended without a summary (exit codes %s%s); retrying "
        "from its last checkpoint (%d of %d retries left)",
        name,
        s.attempts,
        result.get("returncodes"),
        f", {result['error']}" if result.get("error") else "",
        options.max_retries - s.attempts + 1,
        options.max_retries,
      )
    else:
      s.state = "failed"
      logging.error(
        "trial %s: failed after %d attempts (exit codes %s); logs in %s",
        name,
        s.attempts,
        s.returncodes,
        s.trial.workdir,
      )
    write_sweep_json(root, spec, source, states)

  with _StopSignal() as stop:
    try:
      while True:
        if not stop.requested:
          for s in states:
            if len(running) >= options.max_concurrent:
              break
            if s.state == "pending":
              launch(s)
              write_sweep_json(root, spec, source, states)
        if not running:
          break
        refs = {ref: name for name, (_, _, ref) in running.items()}
        ready, _ = ray_trials.wait(list(refs), timeout=1.0)
        for ref in ready:
          finish(refs[ref], ray_trials.result(ref), stop.requested)
        if stop.requested:
          for name, (_, runner, _) in running.items():
            if name not in asked_to_stop:
              ray_trials.request_stop(runner)
              asked_to_stop.add(name)
        if time.time() - last_progress >= options.progress_every_s or ready:
          logging.info("%s", progress_line(spec, states))
          last_progress = time.time()
    except KeyboardInterrupt:
      logging.warning("second signal: killing the running trials without waiting")
      for name in list(running):
        finish(name, {"error": "killed by a second signal"}, stopping=True)
  if stop.requested:
    for s in states:
      if s.state == "pending":
        s.state = "stopped"
  path = write_sweep_json(root, spec, source, states)
  logging.info("%s; states in %s", progress_line(spec, states), path)
  return states


# ---------------------------------------------------------------------------
# The binary


def define_flags() -> None:
  flags.DEFINE_string("sweep", None, "Sweep gin file (path, or relative to gin_configs/).")
  flags.DEFINE_string(
    "root", None, "Directory of the sweep: ROOT/<trial> workdirs and ROOT/sweep.json."
  )
  flags.DEFINE_string(
    "scale", "tiny", "Which scale of the sweep file (its gin scope): tiny or paper."
  )
  flags.DEFINE_bool(
    "dry_run", False, "List the trials with their bindings and workdirs; run nothing."
  )
  flags.DEFINE_string(
    "ray_address",
    None,
    "Ray cluster to join ('auto', 'ray://host:10001'); "
    "default: start a local Ray instance in this process.",
  )
  flags.DEFINE_integer("max_concurrent", 1, "Trials running at once.")
  flags.DEFINE_string(
    "resources_per_trial",
    "CPU=1",
    "Ray resources of each host process of a trial: 'CPU=1,GPU=1' or a JSON object.",
  )
  flags.DEFINE_integer(
    "num_hosts",
    None,
    "Processes (hosts) per trial; default: the sweep file's "
    "sweep.num_hosts (1). With --tpu_type: the slice's host count.",
  )
  flags.DEFINE_string(
    "tpu_type",
    None,
    "Cloud TPU slice per trial, e.g. v4-16: the trial takes the "
    "slice head resource TPU-v4-16-head and runs one process on each host of it.",
  )
  flags.DEFINE_integer(
    "max_retries", 2, "Restarts of a failed or preempted trial (from its checkpoints)."
  )
  flags.DEFINE_multi_string("trial_env", [], "KEY=VALUE set in every trial's environment.")
  flags.DEFINE_multi_string(
    "gin_param",
    [],
    "Extra gin binding for every trial (after the sweep "
    "file's base bindings), e.g. \"DATA_DIR = '/mnt/tfds'\"; not part of "
    "the trial names.",
  )
  flags.DEFINE_integer("num_cpus", None, "CPUs of the local Ray instance (default: all).")
  flags.DEFINE_float("progress_every_s", 30.0, "Seconds between progress log lines.")


def _tpu_hosts(tpu_type: str) -> int:
  """Hosts of a Cloud TPU slice type (v4-16: 16 TensorCores = 8 chips = 2 hosts)."""
  match = re.fullmatch(r"v(\d+)([a-z]*)-(\d+)", tpu_type)
  if not match:
    raise cli.UserError(f"--tpu_type={tpu_type!r}: expected e.g. v4-16, v5p-32, v5litepod-16")
  version, variant, size = match.group(1), match.group(2), int(match.group(3))
  if version in ("2", "3", "4") or variant == "p":  # the number counts TensorCores, 2 per chip
    chips = size // 2
  else:  # v5e / v6e count chips
    chips = size
  chips_per_host = 4 if version in ("2", "3", "4") or variant == "p" else 8 if chips >= 8 else chips
  return max(1, chips // chips_per_host)


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.sweep or not FLAGS.root:
    raise cli.UserError("--sweep and --root are required")
  num_hosts = FLAGS.num_hosts
  if FLAGS.tpu_type and num_hosts is None:
    num_hosts = _tpu_hosts(FLAGS.tpu_type)
  try:
    spec, trials = load_trials(
      FLAGS.sweep, FLAGS.root, FLAGS.scale, num_hosts=num_hosts, extra_bindings=FLAGS.gin_param
    )
    resources = parse_resources(FLAGS.resources_per_trial)
  except (SweepError, ValueError) as e:  # one line, exit status 2 (bt_jax.cli)
    raise cli.UserError(str(e)) from e
  if FLAGS.dry_run:
    print(f"# sweep {spec.name} (scale {spec.scale}): {len(trials)} trials under {FLAGS.root}")
    for t in trials:
      state = "done" if read_summary(t.workdir) is not None else "to run"
      print(f"\n{t.name}  [{state}]\n  workdir: {t.workdir}\n  hosts: {t.num_hosts}")
      print("  gin files: " + " ".join(t.gin_files))
      for b in t.bindings:
        print(f"  {b}")
    return
  env = dict(item.split("=", 1) for item in FLAGS.trial_env)
  options = RunOptions(
    max_concurrent=FLAGS.max_concurrent,
    max_retries=FLAGS.max_retries,
    resources_per_host=resources if not FLAGS.tpu_type else {},
    tpu_type=FLAGS.tpu_type,
    env=env,
    progress_every_s=FLAGS.progress_every_s,
  )
  from experiments import ray_trials  # pylint: disable=g-import-not-at-top

  ray_trials.init(FLAGS.ray_address, FLAGS.num_cpus)
  try:
    states = run_sweep(spec, trials, FLAGS.root, options, FLAGS.sweep)
  finally:
    ray_trials.shutdown()
  c = counts(states)
  if c["failed"] or c["stopped"]:
    raise SystemExit(1 if c["failed"] else 130)


if __name__ == "__main__":
  define_flags()
  cli.run(lambda _: main([sys.argv[0]]))  # --help exits 0; user errors: one line, status 2
