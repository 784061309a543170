"""Shared fixtures of the eval tests: the tiny trained tokenizer and the tiny
vanilla and block models (`tests.utils.eval_model`)."""

import pytest

from bt_jax.data.tokenizer import train_bpe
from tests.utils import TOKENIZER_TEXTS, VOCAB_SIZE, eval_model


@pytest.fixture(scope="session")
def tokenizer():
  return train_bpe(TOKENIZER_TEXTS * 4, vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session", params=["vanilla", "block"])
def model_and_params(request):
  return eval_model(request.param)
