"""Checkpoint conversion: Hugging Face GPT-NeoX and official Block Transformer
checkpoints in, Hugging Face out, and initial params for fine-tuning or
uptraining (docs/convert.md).

    python -m bt_jax.convert from_hf --input pythia-160m/ --workdir runs/pythia_160m
    python -m bt_jax.convert to_hf --workdir runs/pythia_160m --output pythia_160m_hf/
    python -m bt_jax.convert from_block_transformer --input checkpoint-570000/ \\
        --gin_file models/block_b4_85m.gin --tokenizer tokenizer.json --workdir runs/block_85m
"""

from bt_jax.convert.block_transformer import block_params_from_official, from_block_transformer
from bt_jax.convert.gpt_neox import ConversionError
from bt_jax.convert.hf import from_hf, load_hf, to_hf
from bt_jax.convert.init_from import init_params_from, uptrain_params

__all__ = [
  "ConversionError",
  "block_params_from_official",
  "from_block_transformer",
  "from_hf",
  "init_params_from",
  "load_hf",
  "to_hf",
  "uptrain_params",
]
