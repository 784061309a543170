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

import argparse
import sys

import traceback

from bt_jax import cli
from bt_jax.config import DTYPES

# What the converters raise for a bad input (ConversionError is a ValueError;
# an existing output is FileExistsError), beside the OS's errors on a path.
_USER_ERRORS = (*cli.USER_ERRORS, ValueError, FileExistsError)


class _Parser(argparse.ArgumentParser):
  """argparse with a bad flag as one line and exit status 2 (its usage stays in --help)."""

  def error(self, message):
    self.exit(cli.USER_ERROR_EXIT_STATUS,
              f"error: {self.prog}: {cli.one_line(message)} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m bt_jax.convert", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verbose", action="store_true",
                      help="show the traceback of a user error as well as its one-line message")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  p = commands.add_parser("from_hf", help="a local Hugging Face GPT-NeoX folder -> a workdir")
  p.add_argument("--input", required=True, help="folder with config.json, model.safetensors "
                 "(or shards + index, or pytorch_model.bin with torch) and tokenizer.json")
  p.add_argument("--workdir", required=True, help="new bt_jax workdir to write")
  p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype")
  p = commands.add_parser("to_hf", help="a vanilla workdir -> a Hugging Face folder")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--output", required=True, help="new folder to write")
  p = commands.add_parser("from_block_transformer",
                          help="an official Block Transformer checkpoint -> a workdir")
  p.add_argument("--input", required=True, help="model.safetensors (or .bin) or an HF-Trainer "
                 "checkpoint-N/ folder")
  p.add_argument("--gin_file", action="append", required=True,
                 help="model gin file describing the checkpoint (e.g. models/block_b4_85m.gin)")
  p.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
  p.add_argument("--workdir", required=True)
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer.json (default: the one inside --input)")
  p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  p.add_argument("--eval_no_pad", action="store_true",
                 help="score zero-shot tasks without the L-1 left pads (the released >= 300M "
                 "checkpoints, trained without random left padding)")
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from bt_jax import convert  # pylint: disable=import-outside-toplevel
  try:
    if args.command == "from_hf":
      out = convert.from_hf(args.input, args.workdir, dtype=args.dtype)
    elif args.command == "to_hf":
      out = convert.to_hf(args.workdir, args.output, step=args.step)
    else:
      from bt_jax import gin_utils  # pylint: disable=import-outside-toplevel
      config = gin_utils.model_config_from_gin(args.gin_file, args.gin_param)
      out = convert.from_block_transformer(args.input, config, args.workdir,
                                           tokenizer=args.tokenizer, dtype=args.dtype,
                                           eval_no_pad=args.eval_no_pad)
  except _USER_ERRORS as e:
    if args.verbose:
      traceback.print_exc()
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return cli.USER_ERROR_EXIT_STATUS
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top
  logging_utils.quiet_orbax_logs()
  sys.exit(main())
