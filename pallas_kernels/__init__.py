"""Pallas attention kernels, each beside its pure-jnp reference.

Public API:
  flash_attention(q, k, v, *, causal, local_block, segment_ids, mask,
                  return_lse, sm_scale, impl, block_q, block_k)
  decode_attention(q, k_cache, v_cache, ends, *, starts, sm_scale, impl,
                   num_splits, block_k) -> (out, lse): row b sees cache
    positions [starts[b], ends[b]) (ends exclusive; starts default 0, then
    ends[b] is the number of valid positions; left-padded caches pass starts)
  merge_partials(out_parts, lse_parts, axis) -> (out, lse): exact lse merge of
    partial attention results (what decode_attention does across its splits
    and what distributed tree decode does across devices)
  reference_attention / reference_decode_attention (pure jnp, f32 math)

impl: None (auto: "pallas" on gpu/tpu, "xla" on cpu) | "pallas" |
"interpret" (the Pallas kernel in interpret mode, for CPU tests) | "xla".
"""

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention import merge_partials
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import reference_attention
from pallas_kernels.reference import reference_decode_attention

__all__ = [
  "decode_attention",
  "flash_attention",
  "merge_partials",
  "reference_attention",
  "reference_decode_attention",
]
