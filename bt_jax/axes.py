"""Logical axis names: the one place they are defined (MaxText habit).

Parameters get them through their initialisers (`nn.with_logical_partitioning`),
activations through `nn.with_logical_constraint` at layer boundaries, and one
rule list (`DEFAULT_RULES`) maps them onto the physical mesh axes
(data, fsdp, tensor, sequence).
"""

from __future__ import annotations

# Activation axes.
BATCH = "batch"
LENGTH = "length"  # token positions (vanilla, token decoder)
BLOCKS = "blocks"  # block positions (block decoder)
BLOCK_LEN = "block_len"  # positions inside one block
PREFIX = "prefix"  # prefix vectors of the token decoder
ACT_EMBED = "act_embed"  # embedding channels of an activation
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
KV_LENGTH = "kv_length"  # the length axis of a KV cache

# Parameter axes.
EMBED = "embed"
HEADS = "heads"
KV = "kv"  # channels of one head
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
NORM = "norm"

# Physical mesh axes.
MESH_DATA = "data"
MESH_FSDP = "fsdp"
MESH_TENSOR = "tensor"
MESH_SEQUENCE = "sequence"
MESH_AXES = (MESH_DATA, MESH_FSDP, MESH_TENSOR)

# Logical -> mesh rules. Weights are FSDP-sharded along `embed` and
# tensor-parallel along heads / mlp / vocab; activations are data+fsdp sharded
# along batch. Axes without a rule (or mapped to None) stay replicated.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
  (BATCH, (MESH_DATA, MESH_FSDP)),
  (LENGTH, None),
  (BLOCKS, None),
  (BLOCK_LEN, None),
  (PREFIX, None),
  (ACT_EMBED, None),
  (ACT_HEADS, MESH_TENSOR),
  (ACT_MLP, MESH_TENSOR),
  (ACT_VOCAB, MESH_TENSOR),
  (KV_LENGTH, None),
  (EMBED, MESH_FSDP),
  (HEADS, MESH_TENSOR),
  (KV, None),
  (MLP, MESH_TENSOR),
  (VOCAB, MESH_TENSOR),
  (LAYERS, None),
  (NORM, None),
)
