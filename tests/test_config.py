"""Model-kind facts on the configs (bt_jax.config) against the expressions
the callers used before they moved there."""

import pytest

from bt_jax import config as config_lib
from bt_jax.config import BlockConfig, cdiv, round_up
from bt_jax.models import MODELS, BlockTransformer, VanillaLM, build_model
from tests.utils import tiny_config


def _configs():
  yield tiny_config("vanilla", num_layers=1, width=32, vocab_size=64, max_len=64)
  for block_len in (1, 2, 3, 4, 8):
    yield tiny_config(
      "block",
      block_len=block_len,
      block_width=64,
      max_len=96,
      embedder="projection",
      block_layers=1,
      token_layers=1,
      token_width=32,
      vocab_size=64,
    )


@pytest.mark.parametrize(
  "config", list(_configs()), ids=lambda c: f"{c.kind}{getattr(c, 'block_len', '')}"
)
def test_kind_facts_match_the_old_expressions(config):
  is_block = isinstance(config, BlockConfig)
  old_block_len = config.block_len if is_block else 1  # generate, prepare_prompts
  assert config.tokens_per_step == old_block_len
  assert config.first_scored_position == (config.block_len if is_block else 1)  # unigram baseline
  assert config.init_length == (2 * config.block_len if is_block else 8)  # model init
  assert config.init_length == 2 * getattr(config, "block_len", 4)  # train's init
  assert config.packing == ("block" if is_block else "plain")
  for n in range(0, 3 * old_block_len + 3):
    assert config.aligned_length(n) == -(-n // old_block_len) * old_block_len
    old_steps = -(-n // config.block_len) if is_block else n  # num_steps_for
    assert config.num_steps(n) == old_steps


def test_cdiv_and_round_up():
  for a in range(0, 20):
    for b in range(1, 7):
      assert cdiv(a, b) == -(-a // b) == (a + b - 1) // b
      assert round_up(a, b) % b == 0 and a <= round_up(a, b) < a + b
  assert config_lib.cdiv(7, 2) == 4 and config_lib.round_up(7, 4) == 8


def test_models_are_built_by_kind():
  assert MODELS == {"vanilla": VanillaLM, "block": BlockTransformer}
  assert isinstance(build_model(tiny_config("vanilla", num_layers=1, width=32)), VanillaLM)
  assert isinstance(
    build_model(tiny_config("block", block_layers=1, token_layers=1)), BlockTransformer
  )
  with pytest.raises(TypeError, match="unknown model config type dict"):
    build_model({"kind": "vanilla"})
