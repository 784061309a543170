r"""Trains a Block Transformer or a vanilla LM.

    python -m bt_jax.train --gin_file=gin_configs/runs/quickstart.gin --workdir=/tmp/qs
    python -m bt_jax.train --gin_file=gin_configs/experiments/block_b4_85m.gin \
        --gin_param="train.data_dir='/data/tfds'" --workdir=gs-or-shared-dir

Gin only at the edges (T5X habit): the binary parses `--gin_file` / `--gin_param`,
builds a `TrainConfig` (gin name `train`) and the model config (`model.config`),
and calls `train_and_evaluate(workdir, model_config, train_config)`, which takes
plain arguments. The workdir (layout in `bt_jax.checkpointing`) gets:

    config.gin          the operative gin config
    model_config.json   the model trained (dtype overrides applied)
    tokenizer.json      trained on the training split, or copied from tokenizer_path
    checkpoints/<step>  params, optimizer state and data-iterator state (orbax)
    metrics.jsonl       one JSON object per logged step: step, train_loss, ...
    tb/                 TensorBoard event files
    summary.json        final_eval_loss, unigram_entropy, ... (at the end of the run)

Rerunning with the same workdir resumes from the latest checkpoint exactly
(parameters, optimizer, data position); SIGTERM saves a checkpoint and exits 0;
a NaN/inf loss or gradient stops the run before it is checkpointed.

Parallelism: one `jax.sharding.Mesh` with axes (data, fsdp, tensor)
(`train.mesh_shape`); parameters, optimizer state and batches are placed with
NamedShardings derived from the models' logical axis names and
`bt_jax.axes.DEFAULT_RULES`, and the train step is one `jax.jit`. Multi-host
runs call `jax.distributed.initialize` when `--coordinator_address` (or
JAX_COORDINATOR_ADDRESS) is given, or with `--distributed` on platforms jax
auto-detects (Cloud TPU, SLURM).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import app, flags, logging
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bt_jax import axes
from bt_jax import checkpointing
from bt_jax import config as config_lib
from bt_jax import data as data_lib
from bt_jax import gin_utils
from bt_jax import logging_utils
from bt_jax import run_utils
from bt_jax.mesh import batch_axes, data_parallel_size, make_mesh, with_logical_rules
from bt_jax.models import build_model, sequence_loss

METRICS_FILE = run_utils.METRICS_FILE
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.gin"
TB_DIR = run_utils.TB_DIR

# Dense bf16 peak FLOP/s per device, for the MFU estimate (device_kind prefixes).
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN or inf; the run stopped without checkpointing it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train (the model is configured separately, by `model.config`).

  Steps count optimizer updates; each consumes `batch_size` sequences of
  `seq_len` tokens, split into `grad_accum` micro-batches.
  """

  steps: int = 1000
  batch_size: int = 32               # sequences per optimizer step, over all hosts
  seq_len: Optional[int] = None      # None: the model's max_len
  grad_accum: int = 1
  # Optimizer (spec section 3): AdamW, clip 1.0, linear warmup, cosine decay to 10%.
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1          # on matrices and embeddings; not on biases and norms
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  clip_norm: float = 1.0
  # Mixed precision: None keeps the model file's dtype / param_dtype.
  compute_dtype: Optional[str] = None
  param_dtype: Optional[str] = None
  # Evaluation, logging, checkpoints.
  eval_every: int = 500
  eval_batches: int = 16
  eval_batch_size: Optional[int] = None   # None: batch_size // grad_accum
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  stop_at_step: Optional[int] = None  # save and exit at this step (the schedule still uses `steps`)
  seed: int = 0
  # Data: "stdlib", "files:<glob>" or "tfds:<name>" (see bt_jax.data.load_corpus).
  corpus: str = "stdlib"
  corpus_max_bytes: Optional[int] = None       # cap on the training split (local corpora)
  validation_max_bytes: Optional[int] = None
  validation_fraction: float = data_lib.DEFAULT_VALIDATION_FRACTION
  validation_pattern: Optional[str] = None
  text_field: str = "text"
  data_dir: Optional[str] = None
  cache_tokens: bool = True          # keep tokenized documents in memory (small corpora)
  shuffle_window: int = 256
  data_threads: int = 2
  # Tokenizer: a byte-level BPE trained on the training split and cached in the
  # workdir, or a tokenizer.json from `tokenizer_path`.
  tokenizer_vocab_size: Optional[int] = None   # None: the model's vocab_size
  tokenizer_path: Optional[str] = None
  tokenizer_max_docs: Optional[int] = 100_000  # training documents the BPE is trained on
  unigram_max_docs: int = 10_000     # training documents the unigram baseline is fitted on
  # Mesh (data, fsdp, tensor); one -1 takes the remaining devices.
  mesh_shape: tuple[int, int, int] = (-1, 1, 1)
  peak_flops_per_device: Optional[float] = None  # None: looked up from the device kind
  progress_bar: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every",
                 "checkpoint_every", "keep_checkpoints", "unigram_max_docs", "data_threads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
    for name in ("seq_len", "eval_batch_size", "tokenizer_vocab_size", "tokenizer_max_docs",
                 "stop_at_step"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"train.{name} must be a positive integer or None, got {value!r}")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"train.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                       f"train.grad_accum={self.grad_accum}")
    if self.learning_rate <= 0:
      raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ValueError(f"train.clip_norm must be positive (or None: no clipping), got {self.clip_norm}")
    for name in ("compute_dtype", "param_dtype"):
      value = getattr(self, name)
      if value is not None and value not in config_lib.DTYPES:
        raise ValueError(f"train.{name}={value!r}; valid values are {list(config_lib.DTYPES)} or None")
    shape = tuple(self.mesh_shape)
    if len(shape) != len(axes.MESH_AXES) or any(not isinstance(s, int) or (s <= 0 and s != -1)
                                                for s in shape) or shape.count(-1) > 1:
      raise ValueError(f"train.mesh_shape={self.mesh_shape!r} must be {len(axes.MESH_AXES)} positive "
                       f"sizes for the axes {axes.MESH_AXES}, at most one of them -1")

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer part of TrainConfig.

  It reaches the train step as traced scalars (`hyperparams()`), not as
  constants: runs that differ only in learning rate, schedule length or weight
  decay share one compiled step.
  """

  learning_rate: float
  warmup_steps: int
  total_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  clip_norm: Optional[float]   # None: no clipping

  @classmethod
  def from_train_config(cls, cfg: TrainConfig) -> OptimizerConfig:
    return cls(cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.weight_decay,
               cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, cfg.clip_norm)

  def hyperparams(self) -> dict[str, np.ndarray]:
    values = dataclasses.asdict(self)
    if values["clip_norm"] is None:
      values["clip_norm"] = np.inf
    return {k: np.asarray(v, np.float32) for k, v in values.items()}


def learning_rate_schedule(hyperparams):
  """count (updates done so far) -> learning rate of the next update.

  Linear warmup reaching the peak at update `warmup_steps` (the first update
  already has a non-zero rate), then cosine decay to min_lr_ratio * peak at
  `total_steps`. `hyperparams` as from `OptimizerConfig.hyperparams()`.
  """
  peak = hyperparams["learning_rate"]
  end = peak * hyperparams["min_lr_ratio"]
  warmup, total = hyperparams["warmup_steps"], hyperparams["total_steps"]

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    warm = peak * step / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step <= warmup, warm, decayed)

  return schedule


def _decay_mask(params):
  # Weight decay on matrices and embeddings only (HF Trainer / GPT-NeoX habit).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(hyperparams) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with the warmup-cosine schedule (spec section 3)."""
  hp = hyperparams
  return optax.chain(
      optax.clip_by_global_norm(hp["clip_norm"]),
      optax.adamw(learning_rate_schedule(hp), b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                  weight_decay=hp["weight_decay"], mask=_decay_mask))


# ---------------------------------------------------------------------------
# Mesh and shardings


@dataclasses.dataclass(frozen=True)
class _StepFunctions:
  init: Any            # rng -> state, placed on state_shardings
  train_step: Any      # (state, batch [accum, micro, T], hyperparams) -> (state, metrics)
  eval_step: Any       # (params, batch [B, T]) -> sums
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs with shardings
  train_batch_sharding: Any
  eval_batch_sharding: Any


def _loss_sums(model: nn.Module, params, tokens, mask):
  """(sum of target NLLs, {"nll", "tokens", ["pos_nll", "pos_tokens"]}) over one batch."""
  _, aux = sequence_loss(model, params, tokens, mask)
  token_nll, weights = aux["token_nll"], aux["weights"]   # [batch, length]
  sums = {"nll": jnp.sum(token_nll), "tokens": jnp.sum(weights)}
  if isinstance(model.config, config_lib.BlockConfig):
    block_len = model.config.block_len
    batch, length = tokens.shape
    # position t sits at t % block_len inside its block
    sums["pos_nll"] = jnp.sum(token_nll.reshape(batch, length // block_len, block_len), axis=(0, 1))
    sums["pos_tokens"] = jnp.sum(weights.reshape(batch, length // block_len, block_len), axis=(0, 1))
  return sums["nll"], sums


def _train_step(model, param_shardings, state, batch, hyperparams):
  """One optimizer update from a batch {"tokens", "mask"} of [accum, micro, length].

  Micro-batch gradients of the summed NLL are accumulated and divided by the
  total number of target tokens: the same update as one big batch.
  """
  tx = make_optimizer(hyperparams)
  params = state["params"]
  grad_fn = jax.grad(functools.partial(_loss_sums, model), has_aux=True)

  def accumulate(grads, micro_batch):
    micro_grads, sums = grad_fn(params, micro_batch["tokens"], micro_batch["mask"])
    return jax.tree.map(jnp.add, grads, micro_grads), sums

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  grads, sums = jax.lax.scan(accumulate, zeros, batch)
  sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
  num_tokens = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / num_tokens).astype(p.dtype), grads, params)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
               "opt_state": opt_state}
  metrics = dict(sums, loss=sums["nll"] / num_tokens, grad_norm=grad_norm,
                 learning_rate=learning_rate_schedule(hyperparams)(state["step"]))
  return new_state, metrics


def _eval_step(model, params, batch):
  return _loss_sums(model, params, batch["tokens"], batch["mask"])[1]


def _init_state(model, rng):
  tokens = jnp.zeros((1, 2 * getattr(model.config, "block_len", 4)), jnp.int32)
  params = model.init(rng, tokens)["params"]   # boxed with logical axis names
  # The optimizer state's structure does not depend on the hyperparameter values.
  tx = make_optimizer(OptimizerConfig(1.0, 1, 1, 0.1, 0.0, 0.9, 0.95, 1e-8, 1.0).hyperparams())
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


@functools.lru_cache(maxsize=16)
def _step_functions(model: nn.Module, mesh: jax.sharding.Mesh, rules: tuple) -> _StepFunctions:
  """Jitted init / train / eval functions (cached: runs in one process share compiles)."""
  boxed = jax.eval_shape(functools.partial(_init_state, model), jax.random.key(0))
  logical_specs = nn.get_partition_spec(boxed)
  state_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed), state_shardings)
  batch_names = batch_axes(rules)
  P = jax.sharding.PartitionSpec
  train_batch = jax.sharding.NamedSharding(mesh, P(None, batch_names, None))
  eval_batch = jax.sharding.NamedSharding(mesh, P(batch_names, None))
  replicated = jax.sharding.NamedSharding(mesh, P())

  with_rules = functools.partial(with_logical_rules, mesh=mesh, rules=rules)
  init = jax.jit(lambda rng: nn.unbox(_init_state(model, rng)), out_shardings=state_shardings)
  train_step = jax.jit(
      with_rules(functools.partial(_train_step, model, state_shardings["params"])),
      in_shardings=(state_shardings, {"tokens": train_batch, "mask": train_batch}, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(with_rules(functools.partial(_eval_step, model)),
                      in_shardings=(state_shardings["params"], {"tokens": eval_batch, "mask": eval_batch}),
                      out_shardings=replicated)
  return _StepFunctions(init, train_step, eval_step, state_shardings, abstract_state,
                        train_batch, eval_batch)


def _forward_flops(model, abstract_params, batch_size: int, seq_len: int) -> Optional[float]:
  """FLOPs of one forward loss on [batch_size, seq_len], from XLA's cost analysis."""
  try:
    shape = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
    lowered = jax.jit(lambda p, t, m: sequence_loss(model, p, t, m)[0]).lower(params, shape, shape)
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    flops = float(cost["flops"])
    return flops if flops > 0 else None
  except Exception as e:  # cost analysis is best effort: MFU is an estimate
    logging.warning("no FLOP count for the MFU estimate: %s", e)
    return None


def peak_flops(device) -> Optional[float]:
  kind = getattr(device, "device_kind", "")
  for prefix, flops in PEAK_FLOPS:
    if kind.startswith(prefix):
      return flops
  return None


# ---------------------------------------------------------------------------
# Data


def _check_workdir(workdir: str) -> str:
  if not workdir:
    raise ValueError("workdir must be a directory path, got an empty string")
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir!r} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create workdir {workdir!r}: {e}") from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir!r} is not writable")
  return workdir


def _load_split(cfg: TrainConfig, split: str):
  max_bytes = cfg.corpus_max_bytes if split == data_lib.TRAIN else cfg.validation_max_bytes
  return data_lib.load_corpus(
      cfg.corpus, split, validation_fraction=cfg.validation_fraction, max_bytes=max_bytes,
      validation_pattern=cfg.validation_pattern, text_field=cfg.text_field, data_dir=cfg.data_dir)


def _check_has_text(documents, corpus: str, split: str, probe: int = 1000) -> None:
  """An empty corpus is an error, not a run that trains on EOS tokens."""
  for i in range(min(len(documents), probe)):
    if documents[i].strip():
      return
  raise ValueError(f"the {split!r} split of corpus {corpus!r} has no text (checked the first "
                   f"{min(len(documents), probe)} of {len(documents)} documents: all empty)")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _tokenizer(workdir: str, cfg: TrainConfig, train_docs, vocab_size: int) -> data_lib.Tokenizer:
  """Process 0 trains (or copies) the tokenizer into the workdir; the others read it."""
  def texts():
    limit = len(train_docs) if cfg.tokenizer_max_docs is None else min(len(train_docs), cfg.tokenizer_max_docs)
    return (train_docs[i] for i in range(limit))

  tokenizer_vocab = cfg.tokenizer_vocab_size or vocab_size
  if cfg.tokenizer_path is None and tokenizer_vocab > vocab_size:
    raise ValueError(f"train.tokenizer_vocab_size={tokenizer_vocab} exceeds the model's vocab_size "
                     f"{vocab_size}")
  if jax.process_index() == 0:
    tokenizer = data_lib.load_or_train_tokenizer(
        workdir, texts, vocab_size if cfg.tokenizer_path else tokenizer_vocab, cfg.tokenizer_path)
  _sync("tokenizer")
  if jax.process_index() != 0:
    tokenizer = data_lib.Tokenizer.from_file(os.path.join(workdir, checkpointing.TOKENIZER_FILE))
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                     f"{vocab_size}")
  return tokenizer


def _to_global(local: dict[str, np.ndarray], sharding, global_shape) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v, global_shape) for k, v in local.items()}


def _replicated_to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: np.asarray(v[idx]))
          for k, v in batch.items()}


# ---------------------------------------------------------------------------
# Logging


def _by_position(nll, tokens) -> Optional[list[float]]:
  if nll is None:
    return None
  return [float(n / max(t, 1.0)) for n, t in zip(nll, tokens)]


# ---------------------------------------------------------------------------
# The training loop


def resolve_model_config(model_config: config_lib.ModelConfig, cfg: TrainConfig) -> config_lib.ModelConfig:
  """The model config with the run's dtype overrides, as a plain (non-gin) dataclass."""
  cls = config_lib.BlockConfig if isinstance(model_config, config_lib.BlockConfig) else config_lib.VanillaConfig
  fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}
  if cfg.compute_dtype is not None:
    fields["dtype"] = cfg.compute_dtype
  if cfg.param_dtype is not None:
    fields["param_dtype"] = cfg.param_dtype
  return cls(**fields)


def _evaluate(fns: _StepFunctions, params, eval_batches) -> dict[str, Any]:
  totals = None
  for batch in eval_batches:
    sums = fns.eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  loss = float(totals["nll"] / max(float(totals["tokens"]), 1.0))
  result = {"eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 700.0)))}
  by_position = _by_position(totals.get("pos_nll"), totals.get("pos_tokens"))
  if by_position is not None:
    result["eval_loss_by_position"] = by_position
  return result


@dataclasses.dataclass
class _Run:
  """Everything a run needs besides its state, made once by `_prepare`."""

  workdir: str
  cfg: TrainConfig
  model_config: config_lib.ModelConfig
  seq_len: int
  mesh: jax.sharding.Mesh
  fns: _StepFunctions
  tokenizer: data_lib.Tokenizer
  train_tokens: data_lib.TokenizedDocuments
  train_iter: Any                       # grain DatasetIterator (checkpointed)
  eval_np: list[dict[str, np.ndarray]]  # host copies (unigram baseline)
  eval_batches: list[dict[str, jax.Array]]
  hyperparams: dict[str, jax.Array]     # OptimizerConfig as replicated scalars
  num_params: int
  flops_per_step: Optional[float]
  peak_flops: Optional[float]

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.batch_size * self.seq_len


def _prepare(workdir: str, model_config: config_lib.ModelConfig, cfg: TrainConfig,
             operative_config: Optional[str]) -> _Run:
  """Checks the config, loads data and tokenizer, writes config files, builds the step functions."""
  workdir = _check_workdir(workdir)
  model_config = resolve_model_config(model_config, cfg)
  seq_len = cfg.seq_len or model_config.max_len
  if seq_len > model_config.max_len:
    raise ValueError(f"train.seq_len={seq_len} exceeds the model's max_len {model_config.max_len}")
  is_block = isinstance(model_config, config_lib.BlockConfig)
  block_len = model_config.block_len if is_block else None
  if is_block and seq_len % block_len:
    raise ValueError(f"train.seq_len={seq_len} is not a multiple of block_len {block_len}")
  packing = "block" if is_block else "plain"

  mesh = make_mesh(cfg.mesh_shape)
  rules = tuple(axes.DEFAULT_RULES)
  num_processes = jax.process_count()
  data_parallel = data_parallel_size(mesh, rules)
  eval_batch_size = cfg.eval_batch_size or cfg.micro_batch_size
  for name, size in (("micro batch (batch_size / grad_accum)", cfg.micro_batch_size),
                     ("eval batch", eval_batch_size)):
    if size % data_parallel or size % num_processes:
      raise ValueError(f"the {name} of {size} sequences must divide evenly over the "
                       f"{data_parallel} data-parallel shards (mesh {dict(mesh.shape)}) and "
                       f"{num_processes} processes")

  train_docs = _load_split(cfg, data_lib.TRAIN)
  valid_docs = _load_split(cfg, data_lib.VALIDATION)
  _check_has_text(train_docs, cfg.corpus, data_lib.TRAIN)
  _check_has_text(valid_docs, cfg.corpus, data_lib.VALIDATION)
  tokenizer = _tokenizer(workdir, cfg, train_docs, model_config.vocab_size)
  if tokenizer.pad_id != model_config.pad_id:
    raise ValueError(f"the tokenizer's pad/eos id is {tokenizer.pad_id} but the model's pad_id is "
                     f"{model_config.pad_id}; set {type(model_config).__name__}.pad_id = {tokenizer.pad_id}")
  train_tokens = data_lib.TokenizedDocuments(train_docs, tokenizer, cache=cfg.cache_tokens)
  valid_tokens = data_lib.TokenizedDocuments(valid_docs, tokenizer, cache=cfg.cache_tokens)
  train_iter = data_lib.make_train_iterator(
      train_tokens, tokenizer, seq_len=seq_len, block_len=block_len,
      batch_size=cfg.batch_size // num_processes, seed=cfg.seed, packing=packing,
      shuffle_window=cfg.shuffle_window, shard_index=jax.process_index(), shard_count=num_processes,
      num_threads=cfg.data_threads)
  eval_np = data_lib.make_eval_batches(
      valid_tokens, tokenizer, seq_len=seq_len, block_len=block_len, batch_size=eval_batch_size,
      num_batches=cfg.eval_batches, packing=packing, seed=cfg.seed)

  if jax.process_index() == 0:
    if operative_config is not None:
      checkpointing.write_text_atomic(os.path.join(workdir, CONFIG_FILE), operative_config)
    checkpointing.save_model_config(workdir, model_config)

  model = build_model(model_config)
  fns = _step_functions(model, mesh, rules)
  flops = _forward_flops(model, fns.abstract_state["params"], cfg.micro_batch_size, seq_len)
  return _Run(
      workdir=workdir, cfg=cfg, model_config=model_config, seq_len=seq_len, mesh=mesh, fns=fns,
      tokenizer=tokenizer, train_tokens=train_tokens, train_iter=train_iter, eval_np=eval_np,
      eval_batches=[_replicated_to_global(b, fns.eval_batch_sharding) for b in eval_np],
      hyperparams=_replicated_to_global(OptimizerConfig.from_train_config(cfg).hyperparams(),
                                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
      num_params=sum(x.size for x in jax.tree.leaves(fns.abstract_state["params"])),
      flops_per_step=None if flops is None else flops * 3 * cfg.grad_accum,  # fwd + bwd (2x fwd)
      peak_flops=cfg.peak_flops_per_device or peak_flops(jax.devices()[0]))


class _Loop:
  """The training loop: steps, metric windows, evals, checkpoints, stop requests.

  Device metrics are fetched only at log and checkpoint steps (no per-step host
  sync); every fetched step is checked for a non-finite loss or gradient norm
  before anything is logged or checkpointed.
  """

  def __init__(self, run: _Run, checkpointer: checkpointing.Checkpointer, writer: run_utils.MetricWriter,
               state, start_step: int, last_good_step: Optional[int]):
    self.run = run
    self.cfg = run.cfg
    self.checkpointer = checkpointer
    self.writer = writer
    self.state = state
    self.start_step = start_step
    self.last_good_step = last_good_step
    self.pending: list[tuple[int, Any]] = []    # device metrics not yet checked
    self.window: list[dict[str, Any]] = []      # host metrics since the last log
    self.rates: list[float] = []                # tokens/s of each logged window
    self.last_eval: Optional[tuple[int, dict[str, Any]]] = None
    self._reset_timer()

  def _reset_timer(self) -> None:
    self.timer_start, self.timer_steps = time.time(), 0

  def _fetch(self) -> None:
    for step, metrics in self.pending:
      metrics = jax.device_get(metrics)
      if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        last = ("no checkpoint was saved" if self.last_good_step is None else
                f"the last good checkpoint is step {self.last_good_step} in {self.checkpointer.directory}")
        raise NonFiniteLossError(
            f"non-finite loss {float(metrics['loss'])} / gradient norm {float(metrics['grad_norm'])} at "
            f"step {step}; stopping without checkpointing it ({last}). Lower train.learning_rate or "
            "raise train.warmup_steps, then rerun to resume from that checkpoint")
      self.window.append(metrics)
    self.pending = []

  def _train_record(self, step: int) -> dict[str, Any]:
    self._fetch()
    window, elapsed = self.window, time.time() - self.timer_start
    nll = sum(float(m["nll"]) for m in window)
    tokens = sum(float(m["tokens"]) for m in window)
    record = {"step": step, "train_loss": nll / max(tokens, 1.0),
              "learning_rate": float(window[-1]["learning_rate"]),
              "grad_norm": float(window[-1]["grad_norm"])}
    if "pos_nll" in window[-1]:
      record["train_loss_by_position"] = _by_position(
          sum(m["pos_nll"] for m in window), sum(m["pos_tokens"] for m in window))
    if self.timer_steps > 0 and elapsed > 0:
      rate = self.timer_steps * self.run.tokens_per_step / elapsed
      record["tokens_per_s"] = rate
      self.rates.append(rate)
      if self.run.flops_per_step is not None:
        flops_per_s = self.timer_steps * self.run.flops_per_step / elapsed
        record["model_tflops_per_s"] = flops_per_s / 1e12
        if self.run.peak_flops:  # unknown for CPUs: set train.peak_flops_per_device
          record["mfu"] = flops_per_s / (self.run.peak_flops * jax.device_count())
    self.window = []
    return record

  def _save(self, step: int) -> None:
    self._fetch()
    state = self.state
    self.checkpointer.save(step, state["params"], {"step": state["step"], "opt_state": state["opt_state"]},
                           self.run.train_iter)
    self.last_good_step = step

  def _next_batch(self) -> dict[str, jax.Array]:
    cfg, seq_len = self.cfg, self.run.seq_len
    local = {k: v.reshape(cfg.grad_accum, -1, seq_len) for k, v in next(self.run.train_iter).items()}
    return _to_global(local, self.run.fns.train_batch_sharding,
                      (cfg.grad_accum, cfg.micro_batch_size, seq_len))

  def __call__(self, progress=None) -> Optional[int]:
    """Trains to cfg.steps; returns the step it stopped at early, or None."""
    cfg, fns = self.cfg, self.run.fns
    with run_utils.StopRequest() as stop_request:
      for step in range(self.start_step + 1, cfg.steps + 1):
        self.state, metrics = fns.train_step(self.state, self._next_batch(), self.run.hyperparams)
        self.pending.append((step, metrics))
        if step == self.start_step + 1:  # the first step includes compilation: time from its end
          jax.block_until_ready(metrics)
          self._reset_timer()
        else:
          self.timer_steps += 1
        if progress is not None:
          progress.update(1)

        evaluate = step % cfg.eval_every == 0 or step == cfg.steps
        record = self._train_record(step) if step % cfg.log_every == 0 or evaluate else {}
        if evaluate:
          self.last_eval = (step, _evaluate(fns, self.state["params"], self.run.eval_batches))
          record.update(self.last_eval[1])
        if record:
          self.writer.write(record)
          if progress is not None:
            progress.set_postfix({k: f"{record[k]:.3f}" for k in ("train_loss", "eval_loss") if k in record})
        preempted = stop_request.should_stop(
            step, sync_point=bool(record) or step % cfg.checkpoint_every == 0)
        stop = preempted or step == cfg.stop_at_step
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
          self._save(step)
        if record or stop:  # evals and saves do not count as training time
          self._reset_timer()
        if stop:
          logging.warning("stopping at step %d (%s); checkpoint saved in %s", step,
                          ("SIGTERM" if stop_request.requested.is_set() else
                           "SIGTERM or preemption on another host") if preempted
                          else "train.stop_at_step",
                          self.checkpointer.directory)
          return step
      self._fetch()
    return None


def train_and_evaluate(workdir: str, model_config: config_lib.ModelConfig, cfg: TrainConfig,
                       *, operative_config: Optional[str] = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the summary (also written to summary.json).

  Returns early, after checkpointing, when SIGTERM arrives or at `stop_at_step`;
  the summary then has "stopped_at" and no final eval (and is not written).
  Raises NonFiniteLossError when the loss or gradient norm becomes NaN/inf.

  Parameters, optimizer state and batches are placed explicitly with
  NamedSharding; activations follow the models' logical constraints under
  `axes.DEFAULT_RULES` (batch over data+fsdp, heads/mlp/vocab over tensor).
  """
  start_time = time.time()
  run = _prepare(workdir, model_config, cfg, operative_config)
  fns, is_main = run.fns, jax.process_index() == 0
  checkpointer = checkpointing.Checkpointer(run.workdir, keep=cfg.keep_checkpoints,
                                            async_save=cfg.async_checkpointing)
  latest = checkpointer.latest_step()
  if latest is None:
    state, start_step = fns.init(jax.random.key(cfg.seed)), 0
  else:
    abstract = fns.abstract_state
    params, train_state = checkpointer.restore(
        latest, abstract["params"], {"step": abstract["step"], "opt_state": abstract["opt_state"]},
        data_iterator=run.train_iter)
    state = {"step": train_state["step"], "params": params, "opt_state": train_state["opt_state"]}
    start_step = int(jax.device_get(state["step"]))
    logging.info("resumed from %s at step %d", checkpointer.directory, start_step)
  logging.info("%s model, %s parameters; mesh %s; %d steps of %d x %d tokens", run.model_config.kind,
               f"{run.num_params:,}", dict(run.mesh.shape), cfg.steps, cfg.batch_size, run.seq_len)

  writer = run_utils.MetricWriter(run.workdir, start_step, is_main)
  progress = None
  if is_main and cfg.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
  loop = _Loop(run, checkpointer, writer, state, start_step, latest)
  try:
    stopped_at = loop(progress)
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    checkpointer.close()

  state = loop.state
  final_step = int(jax.device_get(state["step"]))
  summary: dict[str, Any] = {"model": run.model_config.kind, "num_params": int(run.num_params),
                             "steps": cfg.steps, "step": final_step}
  if loop.rates:
    summary["tokens_per_s"] = float(np.median(loop.rates))
  if stopped_at is not None:
    summary["stopped_at"] = stopped_at
    summary["wall_s"] = time.time() - start_time
    return summary
  if loop.last_eval is not None and loop.last_eval[0] == final_step:
    final = loop.last_eval[1]
  else:
    final = _evaluate(fns, state["params"], run.eval_batches)
  summary["final_eval_loss"] = final["eval_loss"]
  summary["final_eval_perplexity"] = final["eval_perplexity"]
  if "eval_loss_by_position" in final:
    summary["final_eval_loss_by_position"] = final["eval_loss_by_position"]
  summary["unigram_entropy"] = _unigram_entropy(run.train_tokens, run.eval_np, run.model_config, cfg)
  summary["final_eval_loss_vs_unigram"] = summary["final_eval_loss"] / summary["unigram_entropy"]
  summary["wall_s"] = time.time() - start_time
  if is_main:
    checkpointing.write_text_atomic(os.path.join(run.workdir, SUMMARY_FILE),
                                    json.dumps(summary, indent=2) + "\n")
  logging.info("final eval loss %.4f nats (unigram %.4f); summary in %s", summary["final_eval_loss"],
               summary["unigram_entropy"], os.path.join(run.workdir, SUMMARY_FILE))
  return summary


def _unigram_entropy(train_tokens, eval_np, model_config, cfg: TrainConfig) -> float:
  """Unigram cross-entropy on exactly the validation targets the eval loss scores."""
  length = eval_np[0]["tokens"].shape[1]
  first_target = model_config.block_len if isinstance(model_config, config_lib.BlockConfig) else 1
  scorable = (np.arange(length) >= first_target)[None, :]
  valid = [{"tokens": b["tokens"], "mask": ((b["mask"] > 0) & scorable).astype(np.int32)} for b in eval_np]
  train = (train_tokens[i] for i in range(min(len(train_tokens), cfg.unigram_max_docs)))
  return data_lib.unigram_cross_entropy(train, valid, model_config.vocab_size)


# ---------------------------------------------------------------------------
# The binary: flags and gin at the edge.

GinTrainConfig = gin.external_configurable(TrainConfig, "train")

def define_flags() -> None:
  """The binary's flags. Defined only when run as a program, so that importing
  this module (for its gin configurables) never clashes with other binaries'
  flags of the same name (--workdir)."""
  flags.DEFINE_multi_string("gin_file", [], "Gin files (gin_configs/ is on the search path).")
  flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'train.steps = 100'.")
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs "
                      "(default: $JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detected "
                    "settings (Cloud TPU pods, SLURM, ...).")


def configs_from_gin(gin_files: Sequence[str], gin_params: Sequence[str]):
  """(model config, TrainConfig, operative config str) from gin files and bindings."""
  gin_utils.parse_gin(gin_files, gin_params)
  try:
    model_config = gin_utils.model()
  except Exception as e:
    raise ValueError(f"gin files {list(gin_files)} do not define a valid model (model.config): {e}") from e
  try:
    train_config = GinTrainConfig()
  except Exception as e:
    raise ValueError(f"invalid train config from gin files {list(gin_files)} and bindings "
                     f"{list(gin_params)}: {e}") from e
  return model_config, train_config, gin.operative_config_str()


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, auto: bool = False) -> bool:
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator_address is None and not auto:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --gin_file / --gin_param")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required (e.g. --gin_file=gin_configs/runs/quickstart.gin)")
  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               FLAGS.distributed)
  try:
    model_config, train_config, operative = configs_from_gin(FLAGS.gin_file, FLAGS.gin_param)
  except (FileNotFoundError, ValueError) as e:  # a bad config: the message says it all
    raise SystemExit(f"error: {e}") from None
  try:
    summary = train_and_evaluate(FLAGS.workdir, model_config, train_config, operative_config=operative)
  except NonFiniteLossError as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  define_flags()
  logging_utils.quiet_orbax_logs()
  app.run(main)
