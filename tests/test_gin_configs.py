"""Every shipped gin file parses and builds abstractly; the paper configs have
the parameter counts of the Block Transformer paper's tables."""

from __future__ import annotations

import gin
import jax
import pytest

from bt_jax import gin_utils
from bt_jax.model_summary import param_counts
from bt_jax.models import abstract_params, build_model

# Sweep files bind experiments.sweep; tests/sweeps builds every trial of each.
GIN_FILES = sorted(
  str(p.relative_to(gin_utils.GIN_DIR))
  for p in gin_utils.GIN_DIR.rglob("*.gin")
  if p.relative_to(gin_utils.GIN_DIR).parts[0] != "sweeps"
)

# The training binary registers its run-level configurable `train` on import
# (gin at the edges, as in T5X).
from bt_jax import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from bt_jax import train_drafter  # pylint: disable=g-import-not-at-top,wrong-import-position

# Run procedures meant to be included after a model file: they bind `train`
# only, so they build a TrainConfig but no model.
PROCEDURE_ONLY = {"runs/pretrain.gin", "runs/quickstart_common.gin"}


def test_gin_dir_has_every_paper_config():
  names = {f.removeprefix("models/").removesuffix(".gin") for f in GIN_FILES}
  expected = {
    "vanilla_5m",
    "vanilla_19m",
    "vanilla_85m",
    "vanilla_302m",
    "block_b4_5m",
    "block_b4_19m",
    "block_b4_85m",
    "block_b4_302m",
    "block_b4_805m",
    "block_b4_1p2b",
    "vanilla_tiny",
    "block_b4_tiny",
    "vanilla_base",
    "block_base",
  }
  assert expected <= names, sorted(expected - names)


# Draft-head training (bt_jax.train_drafter): binds `drafter_train` only.
DRAFTER_FILES = {"runs/drafter.gin"}


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_gin_file_parses_and_builds_abstractly(gin_file):
  if gin_file in DRAFTER_FILES:
    config, operative = train_drafter.config_from_gin([gin_file], [])
    assert config == train_drafter.DrafterTrainConfig()  # the file states the defaults
    assert "drafter_train.steps = 600" in operative
    gin.clear_config()
    return
  # pretrain.gin leaves its per-model macros to the experiment files (T5X style).
  macros = {
    "runs/pretrain.gin": ["LEARNING_RATE = 6e-4", "BATCH_SIZE = 256", "STEPS = 100"],
    "runs/uptrain.gin": ["INIT_FROM = '/a/vanilla/workdir'"],
  }.get(gin_file, [])
  gin_utils.parse_gin([gin_file], macros)
  if gin_file.startswith(("runs/", "experiments/")):
    # every run binding names a field of TrainConfig or of its sub-configs
    train_config = train_lib.train_config_from_gin()
    assert isinstance(train_config, train_lib.TrainConfig)
    assert train_config.steps > 0 and train_config.batch_size > 0
  if gin_file in PROCEDURE_ONLY:
    with pytest.raises(RuntimeError, match="Required bindings for `model`"):
      gin_utils.model()  # a procedure file names no model
    gin.clear_config()
    return
  config = gin_utils.model()  # every other file (model, run, experiment) names a model
  params = abstract_params(build_model(config))
  leaves = jax.tree_util.tree_leaves(params)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  gin.clear_config()


# (total, non-embedding) parameters from the paper's tables.
PAPER_COUNTS = {
  "block_b4_5m": (33.9e6, 4.87e6),
  "block_b4_19m": (77.4e6, 19.4e6),
  "block_b4_85m": (173.2e6, 86.2e6),
  "block_b4_302m": (420.3e6, 304.4e6),
  "block_b4_805m": (1045.9e6, 814.1e6),
  "block_b4_1p2b": (1448.8e6, 1217e6),
  "vanilla_5m": (30.5e6, 4.74e6),
  "vanilla_19m": (70.4e6, 18.9e6),
  "vanilla_85m": (162.3e6, 85.1e6),
  "vanilla_302m": (405.3e6, 302.3e6),
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
  config = gin_utils.model_config_from_gin([f"models/{name}.gin"])
  gin.clear_config()
  counts = param_counts(config)
  total, non_embedding = PAPER_COUNTS[name]
  # The spec rounds to 3-4 significant digits; the issue allows 0.5%.
  assert abs(counts["total_params"] / total - 1) < 0.005, (name, counts["total_params"], total)
  assert abs(counts["non_embedding_params"] / non_embedding - 1) < 0.005, (
    name,
    counts["non_embedding_params"],
    non_embedding,
  )


def test_model_summary_binary_json(capsys):
  from bt_jax import cli, model_summary  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  cli.call(model_summary, ["--gin_file", "models/block_b4_1p2b.gin", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert abs(out["total_params"] / 1448.8e6 - 1) < 0.005
  assert abs(out["non_embedding_params"] / 1217e6 - 1) < 0.005
  gin.clear_config()


def test_model_summary_reads_run_gin_files_and_workdirs(tmp_path):
  """A model gin file, a run gin file including it, and a workdir's
  model_config.json give the same counts."""
  from bt_jax import checkpointing, cli, model_summary  # pylint: disable=g-import-not-at-top

  want = cli.call(model_summary, ["--gin_file", "models/block_b4_tiny.gin"])
  config = gin_utils.model_config_from_gin(["runs/quickstart.gin"], skip_unknown=True)
  run = cli.call(model_summary, ["--gin_file", "runs/quickstart.gin"])
  assert run["kind"] == want["kind"] == "block"
  assert run == param_counts(config)  # the run's overrides (width, vocab) apply
  checkpointing.save_model_config(tmp_path, config)
  assert cli.call(model_summary, ["--workdir", str(tmp_path)]) == run
  with pytest.raises(cli.UserError, match="either --gin_file .* or --workdir"):
    cli.call(model_summary, [])
  with pytest.raises(FileNotFoundError, match="has no model_config.json"):
    cli.call(model_summary, ["--workdir", str(tmp_path / "missing")])
  gin.clear_config()


@pytest.mark.parametrize(
  "binding, message",
  [
    (
      "BlockConfig.block_len 8",
      r"malformed gin binding 'BlockConfig.block_len 8'.*"
      r"'Configurable.parameter = value'",
    ),
    (
      "BlockConfig.no_such_field = 3",
      r"could not parse gin binding 'BlockConfig.no_such_field = 3'",
    ),
    ("BlockConfig.block_len = (", r"could not parse gin binding 'BlockConfig.block_len = \('"),
  ],
)
def test_malformed_gin_binding_names_the_binding(binding, message):
  with pytest.raises(ValueError, match=message):
    gin_utils.parse_gin(["models/block_b4_tiny.gin"], [binding])
  gin.clear_config()


def test_missing_gin_file_suggests_shipped_ones():
  with pytest.raises(
    FileNotFoundError,
    match=r"gin file 'models/block_b4_85.gin' not found.*"
    r"did you mean .*models/block_b4_85m.gin",
  ):
    gin_utils.parse_gin(["models/block_b4_85.gin"])


def test_bad_value_through_gin_names_it():
  with pytest.raises(ValueError, match=r"unknown embedder 'conv'"):
    gin_utils.model_config_from_gin(["models/block_b4_tiny.gin"], ["BlockConfig.embedder = 'conv'"])
  gin.clear_config()
