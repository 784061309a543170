r"""Zero-shot HellaSwag / PIQA / ARC of a trained run (lm-evaluation-harness scoring).

    python -m bt_jax.eval_zero_shot --workdir /runs/block_85m \
        --task hellaswag=/data/hellaswag_val.jsonl --task piqa=/data/piqa \
        --task arc_easy=tfds:/data/tfds --out /runs/block_85m/zero_shot.json

A task is NAME=PATH (a raw file, a folder holding it, a prepared TFDS data_dir,
or tfds:DIR) or just NAME with --data FOLDER. Tasks: hellaswag, piqa,
arc_easy, arc_challenge. Prints acc / acc_norm +- stderr (percent) and writes
the JSON to --out (default WORKDIR/zero_shot.json).
"""

import os

from absl import app
from absl import flags

from bt_jax.eval.zero_shot import parse_task_flags, run_zero_shot

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run to evaluate.", required=True)
_TASK = flags.DEFINE_multi_string(
    "task", [], "NAME=PATH or NAME (then PATH is --data); repeat for several tasks. "
    "Names: hellaswag, piqa, arc_easy, arc_challenge.")
_DATA = flags.DEFINE_string("data", None, "Folder holding the raw files or TFDS folders of "
                            "tasks given without =PATH.")
_SPLIT = flags.DEFINE_string("split", None, "TFDS split (default: validation for HellaSwag "
                             "and PIQA, test for ARC, as published numbers use).")
_LIMIT = flags.DEFINE_integer("limit", None, "Score only the first N docs of each task.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
_MAX_BATCH_TOKENS = flags.DEFINE_integer(
    "max_batch_tokens", None, "Cap rows x length per batch (fewer rows for long buckets).")
_MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", "auto", "Devices to evaluate on: 'auto' (every local device data-parallel "
    "when there are several), 'none' (one device), or data,fsdp,tensor sizes such as 2,2,2 "
    "(parameters placed by the training rules, batches split over data x fsdp).")
_OUT = flags.DEFINE_string("out", None, "JSON output (default WORKDIR/zero_shot.json).")
_PER_DOC = flags.DEFINE_bool("per_doc", False, "Also write every choice's log-likelihood.")


def main(argv):
  del argv
  from bt_jax.checkpointing import load_for_inference  # pylint: disable=g-import-not-at-top
  from bt_jax.eval.sharding import eval_sharding_from_flag  # pylint: disable=g-import-not-at-top
  task_paths = parse_task_flags(_TASK.value, _DATA.value)
  sharding = eval_sharding_from_flag(_MESH_SHAPE.value)
  model, params, tokenizer = load_for_inference(_WORKDIR.value, sharding=sharding)
  run_zero_shot(
      model, params, tokenizer, task_paths, limit=_LIMIT.value, split=_SPLIT.value,
      batch_size=_BATCH_SIZE.value, max_batch_tokens=_MAX_BATCH_TOKENS.value,
      out=_OUT.value or os.path.join(_WORKDIR.value, "zero_shot.json"),
      per_doc=_PER_DOC.value, metadata={"workdir": _WORKDIR.value}, sharding=sharding)


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top
  logging_utils.quiet_orbax_logs()
  app.run(main)
