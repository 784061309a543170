"""from_hf / to_hf against transformers' own GPTNeoXForCausalLM (torch CPU, float32)."""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bt_jax import convert
from bt_jax.checkpointing import load_for_inference
from bt_jax.convert.safetensors_io import TensorSource
from bt_jax.inference.generation import generate
from bt_jax.models import token_logprobs
from tests.convert import hf_models
from tests.utils import tiny_config

# name -> GPTNeoXConfig overrides. Tiny widths, the shapes that matter: rotary
# on 25% or all of the head, head_dim 64 or 256, tied or untied head, a
# GPT-NeoX-20B-like rotary base / eps, an MLP of another integer ratio.
CONFIGS = {
  "pythia_like": dict(),
  "rotary_full_tied": dict(rotary_pct=1.0, tie_word_embeddings=True),
  "head_dim_256": dict(
    hidden_size=256, num_attention_heads=1, intermediate_size=1024, rotary_pct=0.25
  ),
  "base_eps_mlp2x": dict(rotary_emb_base=40000, layer_norm_eps=1e-6, intermediate_size=256),
}


def _hf_logprobs(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.double()
  logprobs = torch.log_softmax(logits, -1)[:, :-1]
  return logprobs.gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0].numpy()


@pytest.fixture(scope="module")
def convert_config(tmp_path_factory):
  """name -> (HF model, HF folder, bt_jax workdir), built once per module."""
  cache = {}

  def build(name):
    if name not in cache:
      root = tmp_path_factory.mktemp(name)
      hf_dir, workdir = str(root / "hf"), str(root / "workdir")
      model = hf_models.save_hf_model(hf_dir, hf_models.gpt_neox_config(**CONFIGS[name]))
      convert.from_hf(hf_dir, workdir)
      cache[name] = model, hf_dir, workdir
    return cache[name]

  return build


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logprobs_equal_transformers(convert_config, name):
  hf_model, _, workdir = convert_config(name)
  model, params, tokenizer = load_for_inference(workdir)
  assert model.config.vocab_size == 320 and tokenizer.vocab_size == hf_models.TOKENIZER_VOCAB
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 48))
  logprobs, _ = hf_models.jitted(token_logprobs, model, params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logprobs)[:, 1:], _hf_logprobs(hf_model, ids), atol=1e-4)


# Generation compiles a prefill and a decode loop per shape: two configs suffice.
@pytest.mark.parametrize("name", ["pythia_like", "rotary_full_tied"])
def test_greedy_generation_equals_hf_generate(convert_config, name):
  hf_model, _, workdir = convert_config(name)
  model, params, tokenizer = load_for_inference(workdir)
  prompts = [tokenizer.encode("The quick brown fox"), tokenizer.encode("Question: What do")]
  out = generate(model, params, prompts, max_new_tokens=12)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt)),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
      )
    assert np.asarray(out.tokens[row]).tolist() == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_to_hf_round_trips_exactly(convert_config, name, tmp_path):
  hf_model, hf_dir, workdir = convert_config(name)
  out = str(tmp_path / "back")
  convert.to_hf(workdir, out)
  reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(out).float().eval()
  original = hf_model.state_dict()
  for tensor_name, tensor in reloaded.state_dict().items():
    source = (
      original["gpt_neox.embed_in.weight"]
      if (tensor_name == "embed_out.weight" and hf_model.config.tie_word_embeddings)
      else original[tensor_name]
    )
    assert torch.equal(tensor, source), tensor_name
  ids = np.random.RandomState(1).randint(0, 320, (2, 20))
  np.testing.assert_array_equal(_hf_logprobs(reloaded, ids), _hf_logprobs(hf_model, ids))
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
  text = "Question: What do plants need?\nAnswer: water"
  assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
  assert tokenizer.eos_token_id == 0


def test_sharded_and_pytorch_bin_checkpoints(tmp_path):
  config = hf_models.gpt_neox_config()
  sharded = str(tmp_path / "sharded")
  hf_model = hf_models.save_hf_model(sharded, config)
  hf_model.save_pretrained(sharded, max_shard_size="200KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  assert len(TensorSource.open(sharded)._files) > 1  # pylint: disable=protected-access
  as_bin = str(tmp_path / "bin")
  hf_models.save_hf_model(as_bin, config, safe=False)
  assert os.path.isfile(os.path.join(as_bin, "pytorch_model.bin"))
  ids = np.random.RandomState(2).randint(0, 320, (1, 16))
  for folder in (sharded, as_bin):
    workdir = str(tmp_path / (os.path.basename(folder) + "_wd"))
    convert.from_hf(folder, workdir)
    model, params, _ = load_for_inference(workdir)
    logprobs, _ = hf_models.jitted(token_logprobs, model, params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logprobs)[:, 1:], _hf_logprobs(hf_model, ids), atol=1e-4)


def test_bfloat16_conversion(convert_config, tmp_path):
  hf_model, hf_dir, _ = convert_config("pythia_like")
  workdir = str(tmp_path / "bf16")
  convert.from_hf(hf_dir, workdir, dtype="bfloat16")
  model, params, _ = load_for_inference(workdir)
  assert model.config.param_dtype == "bfloat16"
  assert params["token_embed"]["embedding"].dtype == jnp.bfloat16
  ids = np.random.RandomState(3).randint(0, 320, (1, 16))
  logprobs, _ = hf_models.jitted(token_logprobs, model, params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logprobs)[:, 1:], _hf_logprobs(hf_model, ids), atol=0.1)


# ---- bad input: one clear error each, and nothing left behind ----


@pytest.fixture
def hf_dir(tmp_path):
  folder = str(tmp_path / "hf")
  hf_models.save_hf_model(folder, hf_models.gpt_neox_config())
  return folder


def _assert_nothing_written(tmp_path, name="out"):
  leftovers = [p for p in os.listdir(tmp_path) if p.startswith((name, f".{name}"))]
  assert not leftovers, leftovers


def test_missing_folder_and_files(tmp_path, hf_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.from_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  os.remove(os.path.join(hf_dir, "tokenizer.json"))
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)


def test_missing_weights(tmp_path, hf_dir):
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)


def test_llama_config_is_refused(tmp_path, hf_dir):
  path = os.path.join(hf_dir, "config.json")
  with open(path, "w") as f:
    json.dump(
      transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
      ).to_dict(),
      f,
    )
  with pytest.raises(convert.ConversionError, match="model_type 'llama'.*is not GPT-NeoX"):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("use_parallel_residual", False, "use_parallel_residual = False"),
    ("hidden_act", "gelu_new", "hidden_act = 'gelu_new'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling = "),
    ("intermediate_size", 300, "intermediate_size = 300"),
    ("attention_bias", False, "attention_bias = False"),
  ],
)
def test_unrepresentable_config_fields(tmp_path, hf_dir, field, value, message):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config[field] = value
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(convert.ConversionError, match=message):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)


def test_truncated_safetensors(tmp_path, hf_dir):
  path = os.path.join(hf_dir, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(ValueError, match="is truncated: tensor .* ends at byte"):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)


def test_unrepresentable_tensor_dtype(tmp_path, hf_dir):
  """An 8-bit float tensor (F8_E4M3) in the file: refused, naming the tensor."""
  path = os.path.join(hf_dir, "model.safetensors")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  header["gpt_neox.final_layer_norm.bias"]["dtype"] = "F8_E4M3"
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)
  with pytest.raises(ValueError, match="'gpt_neox.final_layer_norm.bias' has dtype 'F8_E4M3'"):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  with pytest.raises(convert.ConversionError, match="--dtype 'float16' cannot be written"):
    convert.from_hf(hf_dir, str(tmp_path / "out"), dtype="float16")
  _assert_nothing_written(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path, hf_dir):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["intermediate_size"] = 1024
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(
    convert.ConversionError,
    match=r"'gpt_neox.layers.0.mlp.dense_h_to_4h.weight' has shape "
    r"\(512, 128\), expected \(1024, 128\)",
  ):
    convert.from_hf(hf_dir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)


def test_existing_workdir_is_not_overwritten(tmp_path, hf_dir):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="already exists"):
    convert.from_hf(hf_dir, str(out))
  assert os.listdir(out) == ["keep.txt"]


def test_to_hf_refuses_a_block_model(tmp_path):
  import jax
  from bt_jax.convert.workdir import write_workdir
  from bt_jax.models import abstract_params, build_model

  config = tiny_config(
    "block",
    vocab_size=320,
    max_len=32,
    block_width=64,
    token_width=64,
    block_layers=1,
    token_layers=1,
  )
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(build_model(config)))
  workdir = str(tmp_path / "block")
  write_workdir(workdir, config, params, hf_models.tokenizer().to_json())
  with pytest.raises(convert.ConversionError, match="holds a block model; only vanilla"):
    convert.to_hf(workdir, str(tmp_path / "out"))
  _assert_nothing_written(tmp_path)
