"""ReDrafter: a recurrent draft head on the base model's hidden state, beam
search over drafts, dynamic tree attention that dedupes shared prefixes, and
greedy verification or exact speculative sampling (ReDrafter, arXiv
2403.09919; docs/redrafter.md).

    drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=4))
    drafter_params, _ = train_drafter(model, params, drafter, batches, steps=500)
    out = speculative_generate(model, params, drafter, drafter_params, prompts,
                               max_new_tokens=64, beam_width=4)
"""

from bt_jax.redrafter.drafter import (
  DrafterConfig,
  DraftHead,
  drafter_cost,
  init_drafter,
  teacher_forcing_loss,
)
from bt_jax.redrafter.speculative import (
  SpeculativeOutput,
  drafter_draft_fn,
  drafter_generate_fn,
  sampled_draft_fn,
  speculative_generate,
  speculative_generate_fn,
)
from bt_jax.redrafter.checkpoint import load_drafter, save_drafter
from bt_jax.redrafter.train import (
  DistillationData,
  DrafterTrainResult,
  Objective,
  corpus_windows,
  distill_drafter,
  distillation_batches,
  run_drafter_training,
  train_drafter,
)
from bt_jax.redrafter.tree import PackedTree, batched_pack_beams, beam_search, pack_beams
from bt_jax.redrafter.block_speculative import (
  block_hidden_states,
  block_speculative_generate,
  train_block_drafter,
)

__all__ = [
  "block_hidden_states",
  "block_speculative_generate",
  "train_block_drafter",
  "DistillationData",
  "DraftHead",
  "DrafterConfig",
  "DrafterTrainResult",
  "Objective",
  "PackedTree",
  "SpeculativeOutput",
  "batched_pack_beams",
  "beam_search",
  "corpus_windows",
  "distill_drafter",
  "distillation_batches",
  "drafter_cost",
  "drafter_draft_fn",
  "drafter_generate_fn",
  "init_drafter",
  "load_drafter",
  "pack_beams",
  "run_drafter_training",
  "sampled_draft_fn",
  "save_drafter",
  "speculative_generate",
  "speculative_generate_fn",
  "teacher_forcing_loss",
  "train_drafter",
]
