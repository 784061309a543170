"""init_params_from: fine-tuning copies the source exactly; uptraining has the
documented vanilla -> Block Transformer structure."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax import convert
from bt_jax.convert.workdir import write_workdir
from bt_jax.models import abstract_params, build_model
from tests.convert import hf_models
from tests.utils import tiny_config

VANILLA = tiny_config("vanilla", vocab_size=320, max_len=64, num_layers=4, width=64)
BLOCK = tiny_config(
  "block",
  vocab_size=320,
  max_len=64,
  block_layers=2,
  block_width=64,
  token_layers=2,
  token_width=64,
  embedder="projection",
)


@pytest.fixture(scope="module")
def vanilla_workdir(tmp_path_factory):
  # Random values everywhere (norms included), so that a copied LayerNorm is
  # told apart from a fresh one; no jitted init needed.
  rng = np.random.RandomState(3)
  params = jax.tree.map(
    lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), abstract_params(build_model(VANILLA))
  )
  workdir = str(tmp_path_factory.mktemp("src") / "vanilla")
  write_workdir(workdir, VANILLA, params, hf_models.tokenizer().to_json(), step=7)
  return workdir, jax.tree.map(np.asarray, params)


def test_fine_tune_init_equals_source(vanilla_workdir):
  workdir, source = vanilla_workdir
  target = abstract_params(build_model(VANILLA))
  params = convert.init_params_from(workdir, VANILLA, target)
  jax.tree.map(np.testing.assert_array_equal, params, source)


def test_fine_tune_from_hf_folder(tmp_path):
  folder = str(tmp_path / "hf")
  hf_models.save_hf_model(folder, hf_models.gpt_neox_config())
  config, expected, _, _ = convert.load_hf(folder)
  params = convert.init_params_from(folder, config, abstract_params(build_model(config)))
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_fine_tune_shape_mismatch_names_the_parameter(vanilla_workdir):
  workdir, _ = vanilla_workdir
  wider = dataclasses.replace(VANILLA, vocab_size=384)
  with pytest.raises(
    convert.ConversionError,
    match=r"parameter lm_head/kernel: the model at .* has shape "
    r"\(64, 320\), the target model \(64, 384\)",
  ):
    convert.init_params_from(workdir, wider, abstract_params(build_model(wider)))
  rotary = dataclasses.replace(VANILLA, rotary_pct=0.5)
  with pytest.raises(convert.ConversionError, match="stack.rotary_pct: target 0.5, source 0.25"):
    convert.init_params_from(workdir, rotary, abstract_params(build_model(rotary)))


def test_uptrain_structure(vanilla_workdir):
  workdir, source = vanilla_workdir
  model = build_model(BLOCK)
  params = convert.init_params_from(workdir, BLOCK, abstract_params(model))
  jax.tree.map(
    lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail("tree"),
    params,
    abstract_params(model),
  )
  decoder = source["decoder"]
  for i in range(2):  # lower half -> block decoder, upper half -> token decoder
    jax.tree.map(
      np.testing.assert_array_equal, params["block_decoder"][f"layer_{i}"], decoder[f"layer_{i}"]
    )
    jax.tree.map(
      np.testing.assert_array_equal,
      params["token_decoder"][f"layer_{i}"],
      decoder[f"layer_{i + 2}"],
    )
  jax.tree.map(
    np.testing.assert_array_equal, params["token_decoder"]["final_ln"], decoder["final_ln"]
  )
  np.testing.assert_array_equal(params["block_decoder"]["final_ln"]["scale"], np.ones(64))
  np.testing.assert_array_equal(params["block_decoder"]["final_ln"]["bias"], np.zeros(64))
  embed = source["token_embed"]["embedding"]
  np.testing.assert_array_equal(params["token_embed"]["embedding"], embed)
  np.testing.assert_array_equal(params["embedder"]["token_embed"]["embedding"], embed)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], source["lm_head"]["kernel"])
  # The embedder gives the mean of a block's embeddings; each prefix a copy of the context.
  embedder = build_model(BLOCK).bind({"params": params}).embedder
  blocks = jnp.asarray([[[5, 9, 11, 300], [1, 2, 3, 4]]])
  np.testing.assert_allclose(
    np.asarray(embedder(blocks))[0], embed[np.asarray(blocks[0])].mean(1), atol=1e-6
  )
  context = np.random.RandomState(0).randn(3, 64).astype(np.float32)
  expanded = context @ params["expansion"]["kernel"] + params["expansion"]["bias"]
  np.testing.assert_array_equal(expanded.reshape(3, 2, 64), np.stack([context, context], 1))


def test_uptrain_refuses_what_does_not_fit(vanilla_workdir):
  workdir, _ = vanilla_workdir
  for bad, message in [
    (dataclasses.replace(BLOCK, embedder="lookup"), "embedder 'lookup'"),
    (dataclasses.replace(BLOCK, token_layers=3), "must add up to the vanilla num_layers 4"),
    (dataclasses.replace(BLOCK, token_width=128), "both must equal the vanilla width 64"),
  ]:
    with pytest.raises(convert.ConversionError, match=message):
      convert.init_params_from(workdir, bad, abstract_params(build_model(bad)))
  vanilla_target = abstract_params(build_model(VANILLA))
  block_source = str(workdir) + "_block"
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(build_model(BLOCK)))
  write_workdir(block_source, BLOCK, zeros, hf_models.tokenizer().to_json())
  with pytest.raises(
    convert.ConversionError, match="cannot initialise a vanilla model from the block"
  ):
    convert.init_params_from(block_source, VANILLA, vanilla_target)


def test_train_starts_from_the_source_weights(vanilla_workdir):
  """bt_jax.train's fresh state with `train.init_from`: the source's parameters
  (fine-tuning: exactly the source; uptraining: init_params_from's block
  params), placed as the random init was."""
  from bt_jax import axes, train, trainer  # pylint: disable=import-outside-toplevel
  from bt_jax.mesh import make_mesh  # pylint: disable=import-outside-toplevel

  workdir, source = vanilla_workdir
  cfg = train.TrainConfig(init_from=workdir, batch_size=2, steps=2)
  mesh = make_mesh(cfg.mesh_shape)
  for target_config in (VANILLA, BLOCK):
    model = build_model(target_config)
    fns = trainer.step_functions(model, mesh, tuple(axes.DEFAULT_RULES))
    state = train.initial_state(fns, target_config, cfg)
    expected = (
      source
      if target_config is VANILLA
      else convert.init_params_from(workdir, target_config, abstract_params(model))
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["params"], expected
    )
    random_init = fns.init(jax.random.key(cfg.seed))["params"]
    assert jax.tree.structure(state["params"]) == jax.tree.structure(random_init)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(random_init)):
      assert a.sharding == b.sharding and a.dtype == b.dtype
