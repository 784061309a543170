"""A training workdir belongs to one run: its identity, its single writer, and
checkpoints that survive damage.

Three guards, used by `bt_jax.train` (and the inference / eval loaders for the
third):

- `check_same_run`: a workdir already holding a run (its `model_config.json`
  and `config.gin`) is only resumed by the same run. Every differing model
  field or gin binding is named with both values; only the bindings listed in
  `RESUMABLE_BINDINGS` (how long to train, how often to log, evaluate and
  checkpoint) may change on resume.
- `WorkdirLock`: one writer per workdir. An advisory `flock` on `DIR/.lock`,
  which the OS releases when the holding process ends, however it ends, so a
  crashed or killed run never leaves a stale lock; the file names the holder
  (host and pid) for the refusal message.
- `restore_newest_good`: restores the newest checkpoint step that restores
  cleanly; a step that fails is moved aside to `DIR/checkpoints_damaged/`
  (renamed, never deleted) and named in one log line, so a rerun does not trip
  on it again.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from typing import Any, Callable, Optional, Sequence, TypeVar

from absl import logging

from bt_jax.cli import UserError

LOCK_FILE = ".lock"
DAMAGED_DIR = "checkpoints_damaged"

# Bindings that may change when a run is resumed: how long it trains and how
# often it logs, evaluates and checkpoints (gin's `scope/name.field`, matched on
# `name.field`).
RESUMABLE_BINDINGS = frozenset(
  {
    "train.steps",
    "train.stop_at_step",
    "train.log_every",
    "train.eval_every",
    "train.progress_bar",
    "train.peak_flops_per_device",
    "data.threads",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
  }
)
# Model fields that change how a step is computed, not what is trained.
RESUMABLE_MODEL_FIELDS = frozenset({"attention_impl", "remat"})


class WorkdirError(UserError):
  """A workdir cannot be used as asked; the message says what to do instead."""


class WorkdirBusyError(WorkdirError):
  """Another live process holds the workdir."""


class CheckpointRestoreError(WorkdirError):
  """No checkpoint of the workdir (or not the asked-for step) restores cleanly."""


@dataclasses.dataclass(frozen=True)
class Difference:
  where: str  # "model_config.json" or "config.gin"
  name: str  # the field or binding
  old: Any
  new: Any

  def __str__(self) -> str:
    return f"  {self.where}: {self.name}: this workdir has {self.old}, the new run has {self.new}"


# ---------------------------------------------------------------------------
# The run's identity


def parse_gin_bindings(text: str) -> dict[str, str]:
  """`name = value` bindings of an operative gin config, values as written
  (whitespace folded), continuation lines joined; comments, imports and
  includes skipped."""
  bindings: dict[str, str] = {}
  name, value = None, []
  depth = 0

  def flush():
    if name is not None:
      bindings[name] = " ".join(" ".join(value).split())

  for raw in text.splitlines():
    line = raw.split("#", 1)[0].rstrip() if "#" in raw and not _in_string(raw) else raw.rstrip()
    if not line.strip():
      continue
    match = re.match(r"^([A-Za-z_][\w./]*(?:\.[\w]+)*)\s*=\s*(.*)$", line)
    if depth == 0 and match and not raw[0].isspace():
      flush()
      name, value = match.group(1), [match.group(2)]
    elif depth == 0 and re.match(r"^(import|include|from)\b", line.strip()):
      flush()
      name, value = None, []
      continue
    elif name is not None:
      value.append(line.strip())
    else:
      continue
    depth = max(0, depth + sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}"))
  flush()
  return bindings


def _in_string(line: str) -> bool:
  """Whether a '#' in `line` may sit inside a quoted string (then keep the line)."""
  head = line.split("#", 1)[0]
  return head.count("'") % 2 == 1 or head.count('"') % 2 == 1


def _resumable_binding(name: str) -> bool:
  return ".".join(name.split("/")[-1].split(".")[-2:]) in RESUMABLE_BINDINGS


def run_differences(
  workdir: str, model_config_json: str, operative_config: Optional[str]
) -> list[Difference]:
  """What differs between the run saved in `workdir` and a new one.

  `model_config_json` is the new run's `model_config.json` text; the gin
  bindings are compared when both runs have an operative config. Resumable
  bindings and model fields (see the module docstring) are not differences.
  """
  from bt_jax import checkpointing  # pylint: disable=g-import-not-at-top

  differences: list[Difference] = []
  model_path = os.path.join(workdir, checkpointing.MODEL_CONFIG_FILE)
  if os.path.isfile(model_path):
    with open(model_path, encoding="utf-8") as f:
      old_text = f.read()
    try:
      old = json.loads(old_text)
    except ValueError as e:
      raise WorkdirError(
        f"{model_path} is not valid JSON ({e}); this workdir's model config is "
        "damaged: train in a new --workdir"
      ) from e
    new = json.loads(model_config_json)
    if old.get("kind") != new.get("kind"):
      differences.append(
        Difference(checkpointing.MODEL_CONFIG_FILE, "kind", old.get("kind"), new.get("kind"))
      )
    old_fields, new_fields = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_fields) | set(new_fields)):
      if key in RESUMABLE_MODEL_FIELDS:
        continue
      if old_fields.get(key, "<unset>") != new_fields.get(key, "<unset>"):
        differences.append(
          Difference(
            checkpointing.MODEL_CONFIG_FILE,
            key,
            old_fields.get(key, "<unset>"),
            new_fields.get(key, "<unset>"),
          )
        )
  gin_path = os.path.join(workdir, "config.gin")
  if operative_config is not None and os.path.isfile(gin_path):
    with open(gin_path, encoding="utf-8") as f:
      old_bindings = parse_gin_bindings(f.read())
    new_bindings = parse_gin_bindings(operative_config)
    for key in sorted(set(old_bindings) | set(new_bindings)):
      if _resumable_binding(key) or key.split(".")[-1] in RESUMABLE_MODEL_FIELDS:
        continue
      old_value, new_value = old_bindings.get(key, "<unset>"), new_bindings.get(key, "<unset>")
      if old_value != new_value:
        differences.append(Difference("config.gin", key, old_value, new_value))
  return differences


def check_same_run(
  workdir: str,
  model_config_json: str,
  operative_config: Optional[str],
  *,
  start_over_flag: str = "--start_over",
) -> None:
  """Raises WorkdirError, naming every difference, when `workdir` holds another run."""
  differences = run_differences(workdir, model_config_json, operative_config)
  if not differences:
    return
  lines = "\n".join(str(d) for d in differences)
  resumable = ", ".join(sorted(RESUMABLE_BINDINGS))
  raise WorkdirError(
    f"workdir {workdir!r} holds another run; {len(differences)} setting(s) differ:\n{lines}\n"
    f"Nothing was changed. Train in a new --workdir, or pass {start_over_flag} to move this "
    f"run's files aside (into {workdir}/replaced-<time>/) and start from scratch. Only these "
    f"settings may change when a run resumes: {resumable}, and the model's attention_impl / remat."
  )


def move_run_aside(workdir: str) -> Optional[str]:
  """Moves a previous run's files into `workdir/replaced-<UTC time>/` (kept, never deleted);
  returns that folder, or None when there was nothing to move."""
  entries = [e for e in os.listdir(workdir) if e != LOCK_FILE and not e.startswith("replaced-")]
  if not entries:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  target = os.path.join(workdir, f"replaced-{stamp}")
  os.makedirs(target)
  for entry in entries:
    os.replace(os.path.join(workdir, entry), os.path.join(target, entry))
  logging.warning("moved the previous run's files aside into %s", target)
  return target


# ---------------------------------------------------------------------------
# One writer


class WorkdirLock:
  """An exclusive `flock` on DIR/.lock held while a run writes to DIR.

  The kernel drops the lock when the process ends (crash, SIGKILL included), so
  it never goes stale. A second process asking for it gets WorkdirBusyError
  naming the holder's host and pid. `enabled=False` (processes other than 0 of
  a multi-host run) makes it a no-op.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._file = None

  def acquire(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        f.close()
        raise
      f.seek(0)
      holder = f.read().strip() or "an unknown process"
      f.close()
      raise WorkdirBusyError(
        f"workdir {os.path.dirname(self.path)!r} is in use by a live run ({holder}); "
        "wait for it to finish or stop it, or train in another --workdir"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------
# Damaged checkpoints

T = TypeVar("T")


def _short_reason(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return f"{type(error).__name__}: {text[:200]}"


def set_aside(checkpoint_dir: str, step: int, reason: str) -> Optional[str]:
  """Moves step `step` of an orbax checkpoint directory into a sibling
  `checkpoints_damaged/<step>-<UTC time>/` (with a REASON file); returns the new
  path, or None when the step directory is missing or cannot be moved (a
  read-only workdir): then it is only skipped."""
  source = os.path.join(checkpoint_dir, str(step))
  if not os.path.isdir(source):
    return None
  parent = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), DAMAGED_DIR)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  target = os.path.join(parent, f"{step}-{stamp}")
  try:
    os.makedirs(parent, exist_ok=True)
    shutil.move(source, target)
    with open(os.path.join(target, "REASON"), "w", encoding="utf-8") as f:
      f.write(reason + "\n")
  except OSError as e:
    logging.warning(
      "could not move damaged checkpoint step %d aside (%s); it is only skipped", step, e
    )
    return None
  return target


def restore_newest_good(
  checkpoint_dir: str,
  steps: Sequence[int],
  restore: Callable[[int], T],
  *,
  step: Optional[int] = None,
  move_aside: bool = True,
) -> tuple[int, T]:
  """(step, restore(step)) for the newest step that restores cleanly.

  Steps whose restore raises are logged in one line each (which step, why) and,
  with `move_aside`, moved to `checkpoints_damaged/`. With `step` given, only that
  step is tried: if it is damaged, CheckpointRestoreError names it and the newest
  step that does restore (checked read-only; nothing is moved).
  """
  ordered = sorted(set(int(s) for s in steps), reverse=True)
  if step is not None:
    try:
      return step, restore(step)
    except Exception as e:  # pylint: disable=broad-except
      good = None
      for other in ordered:
        if other == step:
          continue
        try:
          restore(other)
          good = other
          break
        except Exception:  # pylint: disable=broad-except
          continue
      newest = (
        "no other step restores"
        if good is None
        else f"the newest good step is {good} (pass --step {good})"
      )
      raise CheckpointRestoreError(
        f"checkpoint step {step} in {checkpoint_dir} does not restore ({_short_reason(e)}); "
        f"{newest}"
      ) from e
  failures = []
  for candidate in ordered:
    try:
      return candidate, restore(candidate)
    except Exception as e:  # pylint: disable=broad-except
      reason = _short_reason(e)
      failures.append(f"{candidate} ({reason})")
      moved = set_aside(checkpoint_dir, candidate, reason) if move_aside else None
      where = f"; moved to {moved}" if moved else ""
      logging.warning(
        "skipped damaged checkpoint step %d in %s: %s%s", candidate, checkpoint_dir, reason, where
      )
  raise CheckpointRestoreError(
    f"no checkpoint in {checkpoint_dir} restores: {'; '.join(failures) or 'no steps'}"
  )


def existing_steps(checkpoint_dir: str) -> list[int]:
  """Integer step directories of an orbax checkpoint directory (finished saves only:
  orbax writes a step under a temporary name and renames it when complete)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(
    int(name)
    for name in os.listdir(checkpoint_dir)
    if name.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, name))
  )
