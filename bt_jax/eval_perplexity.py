r"""Perplexity and loss by token position of one or two trained runs.

    python -m bt_jax.eval_perplexity --workdir /runs/vanilla_85m \
        --compare_workdir /runs/block_85m --data '/data/pg19/test/*.txt' \
        --out_dir /runs/compare_pg19

Documents (read as training reads its files: text files, one document each,
or JSON lines, .gz allowed; UTF-8 required) are cut into lm-evaluation-harness's
rolling loglikelihood windows of each model's context: every token is scored
exactly once, the first after an end-of-text token, each later one with the
tokens before it in its window as context (a document's last window is filled
from the left with earlier tokens). The loss at every window position is
averaged and smoothed in bins of --bin_size positions (the Block Transformer
paper's PG19 study). Writes perplexity.json and loss_by_position.png (both runs
on one plot) to --out_dir (default WORKDIR/perplexity; created). The corpus is
read before any checkpoint is restored, so a bad glob or file is reported at
once: one line on stderr, exit status 2.
"""

import os

from absl import flags

from bt_jax import cli


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Trained run to evaluate.", required=True, **fv)
  flags.DEFINE_string("compare_workdir", None, "A second run, plotted beside the first.", **fv)
  flags.DEFINE_string(
    "data",
    None,
    "Glob of text files (one document a file) or JSON-lines "
    "files (.jsonl, .ndjson, .json; .gz allowed).",
    required=True,
    **fv,
  )
  flags.DEFINE_string("text_field", "text", "Field of a JSON-lines record to read.", **fv)
  flags.DEFINE_string("out_dir", None, "Output folder (default WORKDIR/perplexity).", **fv)
  flags.DEFINE_integer("max_docs", None, "Read at most N documents.", **fv)
  flags.DEFINE_integer("max_windows", None, "Score at most N windows.", **fv)
  flags.DEFINE_integer("context_len", None, "Window length (default: each model's max_len).", **fv)
  flags.DEFINE_string(
    "mesh_shape",
    "auto",
    "Devices to evaluate on: 'auto' (every local device data-parallel "
    "when there are several), 'none' (one device), or data,fsdp,tensor sizes such as 2,2,2 "
    "(parameters placed by the training rules, batches split over data x fsdp).",
    **fv,
  )
  flags.DEFINE_integer("batch_size", 8, "Windows per batch.", **fv)
  flags.DEFINE_integer("bin_size", 64, "Positions per smoothing bin.", **fv)


def _label(workdir, model):
  return f"{model.config.kind} ({os.path.basename(os.path.normpath(workdir))})"


def main(flag_values: flags.FlagValues) -> dict:
  # pylint: disable=import-outside-toplevel  (jax and the models load after flag parsing)
  from bt_jax.checkpointing import load_for_inference
  from bt_jax.eval.perplexity import read_corpus, run_perplexity
  from bt_jax.eval.sharding import eval_sharding_from_flag

  # pylint: enable=import-outside-toplevel
  args = flag_values
  for flag in ("max_docs", "max_windows", "batch_size", "bin_size"):
    if args[flag].value is not None and args[flag].value < 1:
      raise cli.UserError(f"--{flag} {args[flag].value} must be a positive integer")
  texts = read_corpus(args.data, text_field=args.text_field, max_docs=args.max_docs)
  try:
    sharding = eval_sharding_from_flag(args.mesh_shape)
  except ValueError as e:
    raise cli.UserError(cli.one_line(e)) from e
  runs = []
  for workdir in filter(None, [args.workdir, args.compare_workdir]):
    model, params, tokenizer = load_for_inference(workdir, sharding=sharding)
    runs.append((_label(workdir, model), model, params, tokenizer))
  return run_perplexity(
    runs,
    args.data,
    out_dir=args.out_dir or os.path.join(args.workdir, "perplexity"),
    text_field=args.text_field,
    max_docs=args.max_docs,
    max_windows=args.max_windows,
    context_len=args.context_len,
    batch_size=args.batch_size,
    bin_size=args.bin_size,
    sharding=sharding,
    texts=texts,
  )


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_orbax_logs()
  cli.run(main, define_flags)
