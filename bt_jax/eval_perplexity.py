r"""Perplexity and loss by token position of one or two trained runs.

    python -m bt_jax.eval_perplexity --workdir /runs/vanilla_85m \
        --compare_workdir /runs/block_85m --data '/data/pg19/test/*.txt' \
        --out_dir /runs/compare_pg19

Documents are cut into windows of each model's context; the loss at every
window position is averaged and smoothed in bins of --bin_size positions (the
Block Transformer paper's PG19 study). Writes perplexity.json and
loss_by_position.png (both runs on one plot) to --out_dir
(default WORKDIR/perplexity).
"""

import os

from absl import app
from absl import flags

from bt_jax.eval.perplexity import run_perplexity

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run to evaluate.", required=True)
_COMPARE_WORKDIR = flags.DEFINE_string("compare_workdir", None,
                                       "A second run, plotted beside the first.")
_DATA = flags.DEFINE_string("data", None, "Glob of .txt (one document a file) or .jsonl "
                            "files (.gz allowed).", required=True)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field of a jsonl record to read.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder (default WORKDIR/perplexity).")
_MAX_DOCS = flags.DEFINE_integer("max_docs", None, "Read at most N documents.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", None, "Score at most N windows.")
_CONTEXT_LEN = flags.DEFINE_integer("context_len", None,
                                    "Window length (default: each model's max_len).")
_MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", "auto", "Devices to evaluate on: 'auto' (every local device data-parallel "
    "when there are several), 'none' (one device), or data,fsdp,tensor sizes such as 2,2,2 "
    "(parameters placed by the training rules, batches split over data x fsdp).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
_BIN_SIZE = flags.DEFINE_integer("bin_size", 64, "Positions per smoothing bin.")


def _label(workdir, model):
  return f"{model.config.kind} ({os.path.basename(os.path.normpath(workdir))})"


def main(argv):
  del argv
  from bt_jax.checkpointing import load_for_inference  # pylint: disable=g-import-not-at-top
  from bt_jax.eval.sharding import eval_sharding_from_flag  # pylint: disable=g-import-not-at-top
  sharding = eval_sharding_from_flag(_MESH_SHAPE.value)
  runs = []
  for workdir in filter(None, [_WORKDIR.value, _COMPARE_WORKDIR.value]):
    model, params, tokenizer = load_for_inference(workdir, sharding=sharding)
    runs.append((_label(workdir, model), model, params, tokenizer))
  run_perplexity(
      runs, _DATA.value, out_dir=_OUT_DIR.value or os.path.join(_WORKDIR.value, "perplexity"),
      text_field=_TEXT_FIELD.value, max_docs=_MAX_DOCS.value, max_windows=_MAX_WINDOWS.value,
      context_len=_CONTEXT_LEN.value, batch_size=_BATCH_SIZE.value, bin_size=_BIN_SIZE.value,
      sharding=sharding)


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top
  logging_utils.quiet_orbax_logs()
  app.run(main)
