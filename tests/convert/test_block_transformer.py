"""from_block_transformer: a state dict in the official layout scores exactly like
the PyTorch model it came from."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from bt_jax import convert
from bt_jax.checkpointing import load_for_inference
from bt_jax.models import native_logprobs, token_logprobs
from tests.convert import hf_models
from tests.convert.official_block import random_official
from tests.utils import tiny_config

TINY = dict(
  vocab_size=512,
  max_len=128,
  block_len=4,
  prefix_len=2,
  block_layers=2,
  block_width=64,
  token_layers=2,
  token_width=64,
)


def _save(model, folder) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "model.safetensors")
  safetensors.torch.save_file(model.official_state_dict(), path)
  return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  hf_models.tokenizer().save(path)
  return path


@pytest.mark.parametrize("embedder", ["lookup", "projection"])
def test_converted_official_checkpoint_scores_exactly(tmp_path, tokenizer_file, embedder):
  reference = random_official(embedder=embedder)
  # An HF-Trainer folder: checkpoint-N/model.safetensors (+ trainer_state.json).
  folder = str(tmp_path / "run" / "checkpoint-1200")
  _save(reference, folder)
  config = tiny_config("block", embedder=embedder, **TINY)
  workdir = convert.from_block_transformer(
    folder, config, str(tmp_path / "wd"), tokenizer=tokenizer_file
  )
  model, params, _ = load_for_inference(workdir)
  assert json.load(open(os.path.join(workdir, "convert_info.json")))["step"] == 1200
  ids = np.random.RandomState(0).randint(0, 512, (2, 32))
  ours, _ = hf_models.jitted(native_logprobs, model, params, jnp.asarray(ids))
  with torch.no_grad():
    expected = reference.logprobs(torch.tensor(ids)).numpy()
  np.testing.assert_allclose(np.asarray(ours)[:, 4:], expected, atol=1e-4)


def test_eval_no_pad_is_recorded_and_scores_without_left_pad(tmp_path, tokenizer_file):
  reference = random_official(seed=1)
  path = _save(reference, str(tmp_path / "ckpt"))
  workdir = convert.from_block_transformer(
    path,
    tiny_config("block", **TINY),
    str(tmp_path / "wd"),
    tokenizer=tokenizer_file,
    eval_no_pad=True,
  )
  with open(os.path.join(workdir, "model_config.json")) as f:
    assert json.load(f)["config"]["eval_no_pad"] is True
  model, params, _ = load_for_inference(workdir)
  ids = np.random.RandomState(1).randint(1, 512, (2, 15))  # not a block multiple
  logprobs, valid = hf_models.jitted(token_logprobs, model, params, jnp.asarray(ids))
  assert not np.asarray(valid)[:, :4].any() and np.asarray(valid)[:, 4:].all()
  with torch.no_grad():  # the reference on the first 12 tokens (whole blocks)
    expected = reference.logprobs(torch.tensor(ids[:, :12])).numpy()
  np.testing.assert_allclose(np.asarray(logprobs)[:, 4:12], expected, atol=1e-4)
  padded = dataclasses.replace(model.config, eval_no_pad=False)
  from bt_jax.models import build_model

  with_pad, _ = hf_models.jitted(token_logprobs, build_model(padded), params, jnp.asarray(ids))
  assert not np.allclose(np.asarray(with_pad)[:, 4:12], expected, atol=1e-3)


def test_wrong_gin_shape_names_tensor_and_shapes(tmp_path, tokenizer_file):
  path = _save(random_official(), str(tmp_path / "ckpt"))
  config = tiny_config("block", **{**TINY, "token_layers": 1})
  with pytest.raises(
    convert.ConversionError,
    match="map onto nothing: "
    r"\['token_decoder.gpt_neox.layers.1",
  ):
    convert.from_block_transformer(path, config, str(tmp_path / "wd"), tokenizer=tokenizer_file)
  config = tiny_config("block", **{**TINY, "prefix_len": 3})
  with pytest.raises(
    convert.ConversionError,
    match=r"'token_decoder.expansion_layer.weight' has shape \(128, 64, 1\), "
    r"expected \(192, 64, 1\)",
  ):
    convert.from_block_transformer(path, config, str(tmp_path / "wd"), tokenizer=tokenizer_file)
  assert not [p for p in os.listdir(tmp_path) if "wd" in p]


def test_unknown_and_missing_tensors(tmp_path, tokenizer_file):
  state = random_official().official_state_dict()
  extra = dict(state, **{"token_decoder.lm_bias": torch.zeros(512)})
  path = str(tmp_path / "extra.safetensors")
  safetensors.torch.save_file(extra, path)
  with pytest.raises(convert.ConversionError, match=r"\['token_decoder.lm_bias'\]"):
    convert.from_block_transformer(
      path, tiny_config("block", **TINY), str(tmp_path / "wd"), tokenizer=tokenizer_file
    )
  del state["token_decoder.embed_out.weight"]
  path = str(tmp_path / "missing.safetensors")
  safetensors.torch.save_file(state, path)
  with pytest.raises(convert.ConversionError, match="'token_decoder.embed_out.weight' is missing"):
    convert.from_block_transformer(
      path, tiny_config("block", **TINY), str(tmp_path / "wd"), tokenizer=tokenizer_file
    )
  with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
    convert.from_block_transformer(
      str(tmp_path), tiny_config("block", **TINY), str(tmp_path / "wd")
    )


def test_no_pad_scoring_refuses_a_continuation_inside_block_zero():
  from bt_jax.eval.scoring import ScoreRequest, make_window

  request = ScoreRequest((5, 6), (7, 8, 9))
  assert make_window(request, 16) == ([5, 6, 7, 8, 9], 2)
  assert make_window(ScoreRequest((1, 2, 3, 4), (7,)), 16, first_scored=4) == ([1, 2, 3, 4, 7], 4)
  with pytest.raises(
    ValueError,
    match="continuation starts at token 2, but this model scores tokens from position 4 on",
  ):
    make_window(request, 16, first_scored=4)


@pytest.mark.parametrize("decoder", ["summation", "cross_attention"])
def test_other_token_decoders_are_refused_naming_the_variant(tmp_path, tokenizer_file, decoder):
  """Every released official checkpoint has the prefix token decoder; a gin
  file describing another one is refused before anything is read or written."""
  path = _save(random_official(), str(tmp_path / "ckpt"))
  config = tiny_config("block", **{**TINY, "token_decoder": decoder})
  with pytest.raises(
    convert.ConversionError,
    match=f"token_decoder '{decoder}' cannot be read .* reads the 'prefix' token "
    r"decoder only, the one every released checkpoint \(block_main_b4_\*\) uses",
  ):
    convert.from_block_transformer(path, config, str(tmp_path / "wd"), tokenizer=tokenizer_file)
  assert not [p for p in os.listdir(tmp_path) if "wd" in p]
