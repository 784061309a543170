r"""Zero-shot HellaSwag / PIQA / ARC of a trained run (lm-evaluation-harness scoring).

    python -m bt_jax.eval_zero_shot --workdir /runs/block_85m \
        --task hellaswag=/data/hellaswag_val.jsonl --task piqa=/data/piqa \
        --task arc_easy=tfds:/data/tfds --out /runs/block_85m/zero_shot.json

A task is NAME=PATH (a raw file, a folder holding it, a prepared TFDS data_dir,
or tfds:DIR) or just NAME with --data FOLDER. Tasks: hellaswag, piqa,
arc_easy, arc_challenge. Prints acc / acc_norm +- stderr (percent) and writes
the JSON to --out (default WORKDIR/zero_shot.json; its folder is created).
The tasks are read before the checkpoint is restored, so a bad path or file
(a PIQA labels file missing, say) is reported at once: one line on stderr,
exit status 2.
"""

import os

from absl import flags

from bt_jax import cli


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Trained run to evaluate.", required=True, **fv)
  flags.DEFINE_multi_string(
    "task",
    [],
    "NAME=PATH or NAME (then PATH is --data); repeat for several tasks. "
    "Names: hellaswag, piqa, arc_easy, arc_challenge.",
    **fv,
  )
  flags.DEFINE_string(
    "data", None, "Folder holding the raw files or TFDS folders of tasks given without =PATH.", **fv
  )
  flags.DEFINE_string(
    "split",
    None,
    "TFDS split (default: validation for HellaSwag "
    "and PIQA, test for ARC, as published numbers use).",
    **fv,
  )
  flags.DEFINE_integer("limit", None, "Score only the first N docs of each task.", **fv)
  flags.DEFINE_integer("batch_size", 32, "Rows per batch.", **fv)
  flags.DEFINE_integer(
    "max_batch_tokens", None, "Cap rows x length per batch (fewer rows for long buckets).", **fv
  )
  flags.DEFINE_string(
    "mesh_shape",
    "auto",
    "Devices to evaluate on: 'auto' (every local device data-parallel "
    "when there are several), 'none' (one device), or data,fsdp,tensor sizes such as 2,2,2 "
    "(parameters placed by the training rules, batches split over data x fsdp).",
    **fv,
  )
  flags.DEFINE_string("out", None, "JSON output (default WORKDIR/zero_shot.json).", **fv)
  flags.DEFINE_bool("per_doc", False, "Also write every choice's log-likelihood.", **fv)


def main(flag_values: flags.FlagValues) -> dict:
  # pylint: disable=import-outside-toplevel  (jax and the models load after flag parsing)
  from bt_jax.checkpointing import load_for_inference
  from bt_jax.eval.sharding import eval_sharding_from_flag
  from bt_jax.eval.zero_shot import load_tasks, parse_task_flags, run_zero_shot

  # pylint: enable=import-outside-toplevel
  args = flag_values
  try:  # reading the inputs: any error here is about what was given
    task_paths = parse_task_flags(args.task, args.data)
    tasks = load_tasks(task_paths, split=args.split, limit=args.limit)
    sharding = eval_sharding_from_flag(args.mesh_shape)
  except (KeyError, ValueError) as e:
    raise cli.UserError(cli.one_line(e)) from e
  model, params, tokenizer = load_for_inference(args.workdir, sharding=sharding)
  return run_zero_shot(
    model,
    params,
    tokenizer,
    task_paths,
    limit=args.limit,
    split=args.split,
    batch_size=args.batch_size,
    max_batch_tokens=args.max_batch_tokens,
    out=args.out or os.path.join(args.workdir, "zero_shot.json"),
    per_doc=args.per_doc,
    metadata={"workdir": args.workdir},
    sharding=sharding,
    tasks=tasks,
  )


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_orbax_logs()
  cli.run(main, define_flags)
