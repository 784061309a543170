"""How the binaries run: absl flags, user errors as one line, outputs that survive a crash.

A binary defines its flags on a `FlagValues` and reads them in `main`:

    def define_flags(flag_values: flags.FlagValues) -> None:
      flags.DEFINE_string("out", None, "JSON output.", flag_values=flag_values)

    def main(flag_values: flags.FlagValues):
      ...

    if __name__ == "__main__":
      cli.run(main, define_flags)

`run` parses sys.argv with absl (so `--help` lists the flags and exits 0) and
turns a user error, a mistake in what was given (a flag value, a path, a
file's content), into one line `error: ...` on stderr and exit status 2; a
traceback is kept for bugs, and `--verbose` shows it for user errors too.
`call(module, argv)` runs the same binary in-process on a fresh FlagValues,
leaving absl's global flags alone (tests, notebooks).

`run` also drops one harmless start-up line (see `quiet_missing_libtpu`): JAX
saying it found no libtpu on a machine without TPUs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from typing import Any, Callable, Optional, Sequence

from absl import app, flags

USER_ERROR_EXIT_STATUS = 2


class UserError(ValueError):
  """A mistake in what the user gave; its message names the value and what would be valid."""


# What a binary reports as a user error: UserError, and the OS's word on a path
# it was given (those messages name the path).
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (a KeyError's without the quotes repr adds)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(message).split()) or type(error).__name__


def _define_verbose(flag_values: flags.FlagValues) -> None:
  if "verbose" not in flag_values:
    flags.DEFINE_bool(
      "verbose",
      False,
      "Show the traceback of a user error (bad flag, path or "
      "file) as well as its one-line message.",
      flag_values=flag_values,
    )


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(USER_ERROR_EXIT_STATUS)


_HELP_ARGS = {"--help": True, "-help": True, "-?": True, "--helpshort": True, "--helpfull": False}


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with --help exiting 0 (absl's exits 1) and a bad flag
  as a user error (one line, status 2)."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _HELP_ARGS:
      app.usage(shorthelp=_HELP_ARGS[arg], writeto_stdout=True, exitcode=0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{one_line(e)} (see --help for the valid flags)")
  raise AssertionError("unreachable")


class _NoMissingLibtpu(logging.Filter):
  """Drops JAX's INFO line "Unable to initialize backend 'tpu': ... Failed to open
  libtpu.so ..." (no libtpu installed: a CPU or GPU machine). Every other record
  passes, a TPU backend that fails for another reason ("TPU in use by process ...")
  and JAX's warnings ("A Google TPU may be present ...", "An NVIDIA GPU may be
  present ... CUDA-enabled jaxlib is not installed") included: those name a real
  problem."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno != logging.INFO:
      return True
    message = record.getMessage()
    return not (
      message.startswith("Unable to initialize backend 'tpu'")
      and "libtpu" in message
      and "cannot open shared object file" in message
    )


# JAX's backend set-up logs through this logger (jax/_src/xla_bridge.py).
_JAX_BACKEND_LOGGER = "jax._src.xla_bridge"


def quiet_missing_libtpu() -> None:
  """Silences the missing-libtpu start-up line of JAX (idempotent; `run` calls it)."""
  logger = logging.getLogger(_JAX_BACKEND_LOGGER)
  if not any(isinstance(f, _NoMissingLibtpu) for f in logger.filters):
    logger.addFilter(_NoMissingLibtpu())


def run(
  main: Callable[[flags.FlagValues], Any],
  define_flags: Optional[Callable[[flags.FlagValues], None]] = None,
) -> None:
  """Runs `main(flags.FLAGS)` as a program with absl (see the module docstring)."""
  quiet_missing_libtpu()
  if define_flags is not None:
    define_flags(flags.FLAGS)
  _define_verbose(flags.FLAGS)

  def absl_main(argv):
    try:
      if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; every input is a --flag (see --help)")
      main(flags.FLAGS)
    except USER_ERRORS as e:
      if flags.FLAGS.verbose:
        traceback.print_exc()
      _fail(one_line(e))

  app.run(absl_main, flags_parser=_parse_flags)


def parse(
  define_flags: Callable[[flags.FlagValues], None], argv: Sequence[str], program: str = "binary"
) -> flags.FlagValues:
  """A binary's flags parsed from `argv` (flags only) on a fresh FlagValues;
  a bad flag is a UserError."""
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  _define_verbose(flag_values)
  try:
    rest = flag_values([program, *argv])
  except flags.Error as e:
    raise UserError(one_line(e)) from e
  if len(rest) > 1:
    raise UserError(f"unexpected arguments {rest[1:]}; every input is a --flag")
  return flag_values


def call(module: Any, argv: Sequence[str]) -> Any:
  """Runs a binary module (its define_flags and main) in-process; returns main's result."""
  return module.main(parse(module.define_flags, argv, module.__name__))


def make_parent_dirs(path: str) -> str:
  """Creates the folder `path` goes into (an --out file); returns path."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  return path


def write_json_atomic(path: str, value: Any, indent: int = 2) -> None:
  """Writes JSON to a temporary file beside `path`, then renames it over `path`:
  a reader (or a crash) sees the previous complete file or the new one, never
  half of one. Creates the parent folders. Benchmarks call it after every
  scenario, so a crash keeps what was measured."""
  make_parent_dirs(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(value, f, indent=indent)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
