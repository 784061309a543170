"""Inference: KV caches, prefill, decode steps, sampling and `generate`.

    from bt_jax.inference import SamplingConfig, generate
    out = generate(model, params, [[5, 6, 7], [9]], max_new_tokens=16, eos_id=0)

See `generation` for the API, `caches` for the cache layouts (docs/inference.md)
and `decoding` for the per-model prefill and step.
"""

from bt_jax.inference.caches import cache_bytes, init_stack_cache, kv_cache_bytes_per_sample
from bt_jax.inference.decoding import BlockDecoder, VanillaDecoder, decoder_for
from bt_jax.inference.generation import (
  GenerateOutput,
  PromptBatch,
  generate,
  generate_fn,
  make_stream_fns,
  num_steps_for,
  prepare_prompts,
  tokens_per_step,
)
from bt_jax.inference.sampling import SamplingConfig, restrict_logits, sample_logits

__all__ = [
  "BlockDecoder",
  "GenerateOutput",
  "PromptBatch",
  "SamplingConfig",
  "VanillaDecoder",
  "cache_bytes",
  "decoder_for",
  "generate",
  "generate_fn",
  "init_stack_cache",
  "kv_cache_bytes_per_sample",
  "make_stream_fns",
  "num_steps_for",
  "prepare_prompts",
  "restrict_logits",
  "sample_logits",
  "tokens_per_step",
]
