r"""Checkpoint conversion binary (docs/convert.md).

    python -m bt_jax.convert from_hf --input HF_DIR --workdir OUT [--dtype bfloat16|float32]
    python -m bt_jax.convert to_hf --workdir W [--step N] --output HF_DIR
    python -m bt_jax.convert from_block_transformer --input CKPT --gin_file models/block_b4_85m.gin \
        --workdir OUT [--tokenizer tokenizer.json] [--eval_no_pad] [--dtype ...]

Every output is written to a hidden folder beside it and renamed at the end:
an error leaves nothing under the requested name. A user error (a bad flag,
path, file or config) is one line `error: ...` on stderr and exit status 2, as
in the other binaries (`bt_jax.cli`); `--verbose` adds its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional, Sequence

from absl import flags

from bt_jax import cli
from bt_jax.config import DTYPES

COMMANDS = ("from_hf", "to_hf", "from_block_transformer")

# Which flags each command needs (a missing one is a user error naming it).
_REQUIRED = {
  "from_hf": ("input", "workdir"),
  "to_hf": ("workdir", "output"),
  "from_block_transformer": ("input", "gin_file", "workdir"),
}


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of every command (absl has no subcommands: the command is argv[1])."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string(
    "input",
    None,
    "from_hf: folder with config.json, model.safetensors (or "
    "shards + index, or pytorch_model.bin with torch) and tokenizer.json; "
    "from_block_transformer: model.safetensors (or .bin) or an HF-Trainer "
    "checkpoint-N/ folder.",
    **fv,
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "from_hf, from_block_transformer: the new bt_jax workdir "
    "to write; to_hf: the vanilla workdir to read.",
    **fv,
  )
  flags.DEFINE_string("output", None, "to_hf: the new Hugging Face folder to write.", **fv)
  flags.DEFINE_integer("step", None, "to_hf: checkpoint step (default: the newest good one).", **fv)
  flags.DEFINE_multi_string(
    "gin_file",
    [],
    "from_block_transformer: model gin file describing "
    "the checkpoint (e.g. models/block_b4_85m.gin).",
    **fv,
  )
  flags.DEFINE_multi_string("gin_param", [], "from_block_transformer: extra gin bindings.", **fv)
  flags.DEFINE_string(
    "tokenizer",
    None,
    "from_block_transformer: tokenizer.json (default: the one inside --input).",
    **fv,
  )
  flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Parameter dtype of the output.", **fv)
  flags.DEFINE_bool(
    "eval_no_pad",
    False,
    "from_block_transformer: score zero-shot tasks without "
    "the L-1 left pads (the released >= 300M checkpoints, trained without random "
    "left padding).",
    **fv,
  )


def split_command(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
  """(command, argv without it): the command is the first argument when it is not a flag."""
  argv = list(argv)
  if len(argv) > 1 and not argv[1].startswith("-"):
    return argv[1], [argv[0], *argv[2:]]
  return None, argv


def main(flag_values: flags.FlagValues, command: Optional[str] = None) -> str:
  if command not in COMMANDS:
    given = "no command" if command is None else f"command {command!r}"
    raise cli.UserError(
      f"{given}: expected one of {', '.join(COMMANDS)} first, e.g. "
      "`python -m bt_jax.convert from_hf --input HF_DIR --workdir OUT`"
    )
  missing = [f"--{name}" for name in _REQUIRED[command] if not flag_values[name].value]
  if missing:
    raise cli.UserError(f"{command} needs {', '.join(missing)} (see --help)")
  from bt_jax import convert  # pylint: disable=import-outside-toplevel

  f = flag_values
  try:
    if command == "from_hf":
      out = convert.from_hf(f.input, f.workdir, dtype=f.dtype)
    elif command == "to_hf":
      out = convert.to_hf(f.workdir, f.output, step=f.step)
    else:
      from bt_jax import gin_utils  # pylint: disable=import-outside-toplevel

      config = gin_utils.model_config_from_gin(f.gin_file, f.gin_param)
      out = convert.from_block_transformer(
        f.input, config, f.workdir, tokenizer=f.tokenizer, dtype=f.dtype, eval_no_pad=f.eval_no_pad
      )
  except (ValueError, FileExistsError) as e:
    # What the converters raise for a bad input (ConversionError is a ValueError; an
    # existing output is FileExistsError): a user error, one line.
    if isinstance(e, cli.UserError):
      raise
    raise cli.UserError(cli.one_line(e)) from e
  print(f"wrote {out}")
  return out


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_orbax_logs()
  _command, sys.argv = split_command(sys.argv)
  cli.run(functools.partial(main, command=_command), define_flags)
