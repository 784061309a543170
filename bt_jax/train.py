r"""Trains a Block Transformer or a vanilla LM.

    python -m bt_jax.train --gin_file=gin_configs/runs/quickstart.gin --workdir=/tmp/qs
    python -m bt_jax.train --gin_file=gin_configs/experiments/block_b4_85m.gin \
        --gin_param="data.data_dir='/data/tfds'" --workdir=gs-or-shared-dir

Gin only at the edges (T5X habit): the binary parses `--gin_file` / `--gin_param`,
builds a `TrainConfig` (gin name `train`, with the sub-configs `optimizer`
(`bt_jax.optim.OptimizerConfig`), `data` and `checkpoint`) and the model config
(`model.config`), and calls `train_and_evaluate(workdir, model_config,
train_config)`, which takes plain arguments and runs the loop over the steps of
`bt_jax.trainer`. The workdir (layout in `bt_jax.checkpointing`) gets:

    config.gin          the operative gin config
    model_config.json   the model trained (dtype overrides applied)
    tokenizer.json      trained on the training split, or copied from tokenizer_path
    checkpoints/<step>  params, optimizer state and data-iterator state (orbax)
    metrics.jsonl       one JSON object per logged step: step, train_loss, ...; a
                        fresh run starts with its step-0 eval (eval_loss before any update)
    tb/                 TensorBoard event files
    summary.json        final_eval_loss, unigram_entropy, ... (at the end of the run)

Rerunning with the same workdir resumes from the latest checkpoint exactly
(parameters, optimizer, data position); SIGTERM saves a checkpoint and exits 0;
a NaN/inf loss or gradient stops the run before it is checkpointed.

Parallelism: one `jax.sharding.Mesh` with axes (data, fsdp, tensor)
(`train.mesh_shape`); parameters, optimizer state and batches are placed with
NamedShardings derived from the models' logical axis names and
`bt_jax.axes.DEFAULT_RULES` (`bt_jax.trainer.step_functions`), and the train
step is one `jax.jit`. Multi-host
runs call `jax.distributed.initialize` when `--coordinator_address` (or
JAX_COORDINATOR_ADDRESS) is given, or with `--distributed` on platforms jax
auto-detects (Cloud TPU, SLURM). Every process reads and packs the whole
training stream and keeps the rows of each global batch that its devices
hold, so a run's batches, and its losses up to float rounding, do not depend
on the number of processes (docs/sweeps.md, "Multi-host trials").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import flags, logging
import gin
import jax
import numpy as np

from bt_jax import axes
from bt_jax import checkpointing
from bt_jax import cli
from bt_jax import config as config_lib
from bt_jax import data as data_lib
from bt_jax import gin_utils
from bt_jax import logging_utils
from bt_jax import optim
from bt_jax import run_utils
from bt_jax import trainer
from bt_jax import workdir as workdir_lib
from bt_jax.mesh import make_mesh, row_groups
from bt_jax.models import build_model

METRICS_FILE = run_utils.METRICS_FILE
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.gin"
TB_DIR = run_utils.TB_DIR


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN or inf; the run stopped without checkpointing it."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint save failed; the run stopped (it never trains on after a failed save)."""


def _check_positive(scope: str, config, names, optional: bool = False) -> None:
  for name in names:
    value = getattr(config, name)
    if optional and value is None:
      continue
    if not isinstance(value, int) or value <= 0:
      raise ValueError(
        f"{scope}.{name} must be a positive integer{' or None' if optional else ''}, got {value!r}"
      )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The corpus, its splits and the tokenizer (gin name `data`)."""

  # "stdlib", "files:<glob>" or "tfds:<name>" (see bt_jax.data.load_corpus).
  corpus: str = "stdlib"
  corpus_max_bytes: Optional[int] = None  # cap on the training split (local corpora)
  validation_max_bytes: Optional[int] = None
  validation_fraction: float = data_lib.DEFAULT_VALIDATION_FRACTION
  validation_pattern: Optional[str] = None
  text_field: str = "text"
  data_dir: Optional[str] = None
  cache_tokens: bool = True  # keep tokenized documents in memory (small corpora)
  shuffle_window: int = 256
  threads: int = 2
  # Tokenizer: a byte-level BPE trained on the training split and cached in the
  # workdir, or a tokenizer.json from `tokenizer_path`.
  tokenizer_vocab_size: Optional[int] = None  # None: the model's vocab_size
  tokenizer_path: Optional[str] = None
  tokenizer_max_docs: Optional[int] = 100_000  # training documents the BPE is trained on
  unigram_max_docs: int = 10_000  # training documents the unigram baseline is fitted on

  def __post_init__(self):
    _check_positive("data", self, ("unigram_max_docs", "threads"))
    _check_positive("data", self, ("tokenizer_vocab_size", "tokenizer_max_docs"), optional=True)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and how checkpoints are written (gin name `checkpoint`)."""

  every: int = 1000  # steps between checkpoints (and at the last step)
  keep: int = 3  # the newest `keep` are kept
  async_save: bool = True

  def __post_init__(self):
    _check_positive("checkpoint", self, ("every", "keep"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train (the model is configured separately, by `model.config`).

  Steps count optimizer updates; each consumes `batch_size` sequences of
  `seq_len` tokens, split into `grad_accum` micro-batches. The optimizer, data
  and checkpoint settings are sub-configs, bound in gin as `optimizer.*`,
  `data.*` and `checkpoint.*` (Levanter / T5X habit).
  """

  steps: int = 1000
  batch_size: int = 32  # sequences per optimizer step, over all hosts
  seq_len: Optional[int] = None  # None: the model's max_len
  grad_accum: int = 1
  # Mixed precision: None keeps the model file's dtype / param_dtype.
  compute_dtype: Optional[str] = None
  param_dtype: Optional[str] = None
  # Evaluation and logging.
  eval_every: int = 500
  eval_batches: int = 16
  eval_batch_size: Optional[int] = None  # None: batch_size // grad_accum
  log_every: int = 50
  stop_at_step: Optional[int] = None  # save and exit at this step (the schedule still uses `steps`)
  # Start from existing weights (a bt_jax workdir or a HF GPT-NeoX folder) instead
  # of a random init: fine-tuning for the same architecture, uptraining for a
  # vanilla source and a Block Transformer target (`bt_jax.convert.init_params_from`,
  # docs/convert.md). Used only when the workdir has no checkpoint yet.
  init_from: Optional[str] = None
  seed: int = 0
  # Mesh (data, fsdp, tensor); one -1 takes the remaining devices.
  mesh_shape: tuple[int, int, int] = (-1, 1, 1)
  peak_flops_per_device: Optional[float] = None  # None: looked up from the device kind
  progress_bar: bool = True
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  data: DataConfig = DataConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def __post_init__(self):
    _check_positive(
      "train",
      self,
      ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"),
    )
    _check_positive("train", self, ("seq_len", "eval_batch_size", "stop_at_step"), optional=True)
    if self.batch_size % self.grad_accum:
      raise ValueError(
        f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
      )
    for name in ("compute_dtype", "param_dtype"):
      value = getattr(self, name)
      if value is not None and value not in config_lib.DTYPES:
        raise ValueError(
          f"train.{name}={value!r}; valid values are {list(config_lib.DTYPES)} or None"
        )
    shape = tuple(self.mesh_shape)
    if (
      len(shape) != len(axes.MESH_AXES)
      or any(not isinstance(s, int) or (s <= 0 and s != -1) for s in shape)
      or shape.count(-1) > 1
    ):
      raise ValueError(
        f"train.mesh_shape={self.mesh_shape!r} must be {len(axes.MESH_AXES)} positive "
        f"sizes for the axes {axes.MESH_AXES}, at most one of them -1"
      )

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum


# ---------------------------------------------------------------------------
# Data


def _check_workdir(workdir: str) -> str:
  if not workdir:
    raise cli.UserError("workdir must be a directory path, got an empty string")
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


def _load_split(data: DataConfig, split: str):
  max_bytes = data.corpus_max_bytes if split == data_lib.TRAIN else data.validation_max_bytes
  return data_lib.load_corpus(
    data.corpus,
    split,
    validation_fraction=data.validation_fraction,
    max_bytes=max_bytes,
    validation_pattern=data.validation_pattern,
    text_field=data.text_field,
    data_dir=data.data_dir,
  )


def _check_has_text(documents, corpus: str, split: str, probe: int = 1000) -> None:
  """An empty corpus is an error, not a run that trains on EOS tokens."""
  for i in range(min(len(documents), probe)):
    if documents[i].strip():
      return
  raise cli.UserError(
    f"the {split!r} split of corpus {corpus!r} has no text (checked the first "
    f"{min(len(documents), probe)} of {len(documents)} documents: all empty); point "
    "data.corpus (and data.validation_pattern) at files with text"
  )


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _tokenizer(workdir: str, data: DataConfig, train_docs, vocab_size: int) -> data_lib.Tokenizer:
  """Process 0 trains (or copies) the tokenizer into the workdir; the others read it."""

  def texts():
    limit = len(train_docs)
    if data.tokenizer_max_docs is not None:
      limit = min(limit, data.tokenizer_max_docs)
    return (train_docs[i] for i in range(limit))

  tokenizer_vocab = data.tokenizer_vocab_size or vocab_size
  if data.tokenizer_path is None and tokenizer_vocab > vocab_size:
    raise cli.UserError(
      f"data.tokenizer_vocab_size={tokenizer_vocab} exceeds the model's vocab_size {vocab_size}"
    )
  if jax.process_index() == 0:
    tokenizer = data_lib.load_or_train_tokenizer(
      workdir, texts, vocab_size if data.tokenizer_path else tokenizer_vocab, data.tokenizer_path
    )
  _sync("tokenizer")
  if jax.process_index() != 0:
    tokenizer = data_lib.Tokenizer.from_file(os.path.join(workdir, checkpointing.TOKENIZER_FILE))
  if tokenizer.vocab_size > vocab_size:
    raise cli.UserError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}"
    )
  return tokenizer


def _global_batch(batch: dict[str, np.ndarray], sharding, grad_accum: int) -> dict[str, jax.Array]:
  """A global train batch {"tokens", "mask"} of [batch_size, seq_len], the same
  on every process, as arrays of [grad_accum, batch_size // grad_accum, seq_len]
  on `sharding`: micro-batch k is rows [k * micro, (k + 1) * micro), and each
  process transfers to its devices only the rows the sharding puts there
  (local data of the global shape: each device takes its own slice of it).
  So the step sees the same rows, in the same micro-batches, for any number
  of processes and any device order."""
  out = {}
  for key, value in batch.items():
    value = value.reshape(grad_accum, -1, value.shape[-1])
    out[key] = jax.make_array_from_process_local_data(sharding, value, value.shape)
  return out


def _replicated_to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: np.asarray(v[idx]))
    for k, v in batch.items()
  }


# ---------------------------------------------------------------------------
# The training loop


def resolve_model_config(
  model_config: config_lib.ModelConfig, cfg: TrainConfig
) -> config_lib.ModelConfig:
  """The model config with the run's dtype overrides (train.compute_dtype, train.param_dtype)."""
  overrides = {"dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype}
  return dataclasses.replace(model_config, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass
class _Run:
  """Everything a run needs besides its state, made once by `_prepare`."""

  workdir: str
  cfg: TrainConfig
  model_config: config_lib.ModelConfig
  seq_len: int
  mesh: jax.sharding.Mesh
  fns: trainer.StepFunctions
  tokenizer: data_lib.Tokenizer
  train_tokens: data_lib.TokenizedDocuments
  train_iter: Any  # grain DatasetIterator (checkpointed)
  eval_np: list[dict[str, np.ndarray]]  # host copies (unigram baseline)
  eval_batches: list[dict[str, jax.Array]]
  hyperparams: dict[str, jax.Array]  # OptimizerConfig as replicated scalars
  num_params: int
  flops_per_step: Optional[float]
  peak_flops: Optional[float]

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.batch_size * self.seq_len


def _prepare(
  workdir: str,
  model_config: config_lib.ModelConfig,
  cfg: TrainConfig,
  operative_config: Optional[str],
) -> _Run:
  """Checks the config, loads data and tokenizer, writes config files, builds the step functions."""
  workdir = _check_workdir(workdir)
  model_config = resolve_model_config(model_config, cfg)
  seq_len = cfg.seq_len or model_config.max_len
  if seq_len > model_config.max_len:
    raise cli.UserError(
      f"train.seq_len={seq_len} exceeds the model's max_len {model_config.max_len}"
    )
  packing = model_config.packing
  block_len = model_config.block_len if packing == "block" else None
  if seq_len % model_config.tokens_per_step:
    raise cli.UserError(f"train.seq_len={seq_len} is not a multiple of block_len {block_len}")

  mesh = make_mesh(cfg.mesh_shape)
  rules = tuple(axes.DEFAULT_RULES)
  num_processes = jax.process_count()
  data_parallel = row_groups(mesh, rules)
  eval_batch_size = cfg.eval_batch_size or cfg.micro_batch_size
  for name, size in (
    ("micro batch (batch_size / grad_accum)", cfg.micro_batch_size),
    ("eval batch", eval_batch_size),
  ):
    if size % data_parallel or size % num_processes:
      raise cli.UserError(
        f"the {name} of {size} sequences must divide evenly over the "
        f"{data_parallel} data-parallel shards (mesh {dict(mesh.shape)}) and "
        f"{num_processes} processes"
      )

  train_docs = _load_split(cfg.data, data_lib.TRAIN)
  valid_docs = _load_split(cfg.data, data_lib.VALIDATION)
  _check_has_text(train_docs, cfg.data.corpus, data_lib.TRAIN)
  _check_has_text(valid_docs, cfg.data.corpus, data_lib.VALIDATION)
  tokenizer = _tokenizer(workdir, cfg.data, train_docs, model_config.vocab_size)
  if tokenizer.pad_id != model_config.pad_id:
    raise cli.UserError(
      f"the tokenizer's pad/eos id is {tokenizer.pad_id} but the model's pad_id "
      f"is {model_config.pad_id}; set {type(model_config).__name__}.pad_id = "
      f"{tokenizer.pad_id}"
    )
  train_tokens = data_lib.TokenizedDocuments(train_docs, tokenizer, cache=cfg.data.cache_tokens)
  valid_tokens = data_lib.TokenizedDocuments(valid_docs, tokenizer, cache=cfg.data.cache_tokens)
  # Every process packs the same global stream and yields whole global batches;
  # `_global_batch` keeps the rows of this process's devices. The batches are
  # thus the same for any process count (docs/sweeps.md, "Multi-host trials").
  train_iter = data_lib.make_train_iterator(
    train_tokens,
    tokenizer,
    seq_len=seq_len,
    block_len=block_len,
    batch_size=cfg.batch_size,
    seed=cfg.seed,
    packing=packing,
    shuffle_window=cfg.data.shuffle_window,
    num_threads=cfg.data.threads,
  )
  eval_np = data_lib.make_eval_batches(
    valid_tokens,
    tokenizer,
    seq_len=seq_len,
    block_len=block_len,
    batch_size=eval_batch_size,
    num_batches=cfg.eval_batches,
    packing=packing,
    seed=cfg.seed,
  )

  if jax.process_index() == 0:
    if operative_config is not None:
      checkpointing.write_text_atomic(os.path.join(workdir, CONFIG_FILE), operative_config)
    checkpointing.save_model_config(workdir, model_config)

  model = build_model(model_config)
  fns = trainer.step_functions(model, mesh, rules)
  flops = trainer.forward_flops(model, fns.abstract_state["params"], cfg.micro_batch_size, seq_len)
  return _Run(
    workdir=workdir,
    cfg=cfg,
    model_config=model_config,
    seq_len=seq_len,
    mesh=mesh,
    fns=fns,
    tokenizer=tokenizer,
    train_tokens=train_tokens,
    train_iter=train_iter,
    eval_np=eval_np,
    eval_batches=[_replicated_to_global(b, fns.eval_batch_sharding) for b in eval_np],
    hyperparams=_replicated_to_global(
      cfg.optimizer.hyperparams(total_steps=cfg.steps),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    ),
    num_params=sum(x.size for x in jax.tree.leaves(fns.abstract_state["params"])),
    flops_per_step=None if flops is None else flops * 3 * cfg.grad_accum,  # fwd + bwd (2x fwd)
    peak_flops=cfg.peak_flops_per_device or trainer.peak_flops(jax.devices()[0]),
  )


class _Loop:
  """The training loop: steps, metric windows, evals, checkpoints, stop requests.

  Device metrics are fetched only at log and checkpoint steps (no per-step host
  sync); every fetched step is checked for a non-finite loss or gradient norm
  before anything is logged or checkpointed.
  """

  def __init__(
    self,
    run: _Run,
    checkpointer: checkpointing.Checkpointer,
    writer: run_utils.MetricWriter,
    state,
    start_step: int,
    last_good_step: Optional[int],
    stop_request: Optional[run_utils.StopRequest] = None,
  ):
    self.run = run
    self.stop_request = stop_request
    self.cfg = run.cfg
    self.checkpointer = checkpointer
    self.writer = writer
    self.state = state
    self.start_step = start_step
    self.last_good_step = last_good_step
    self.pending: list[tuple[int, Any]] = []  # device metrics not yet checked
    self.window: list[dict[str, Any]] = []  # host metrics since the last log
    self.rates: list[float] = []  # tokens/s of each logged window
    self.last_eval: Optional[tuple[int, dict[str, Any]]] = None
    self.train_seconds, self.timed_steps = 0.0, 0  # after the first (compiling) step
    self._reset_timer()

  def _reset_timer(self) -> None:
    self.timer_start, self.timer_steps = time.time(), 0

  def _fetch(self) -> None:
    for step, metrics in self.pending:
      metrics = jax.device_get(metrics)
      if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        last = (
          "no checkpoint was saved"
          if self.last_good_step is None
          else f"the last good checkpoint is step {self.last_good_step} in {self.checkpointer.directory}"
        )
        raise NonFiniteLossError(
          f"non-finite loss {float(metrics['loss'])} / gradient norm {float(metrics['grad_norm'])} at "
          f"step {step}; stopping without checkpointing it ({last}). Lower optimizer.learning_rate or "
          "raise optimizer.warmup_steps, then rerun to resume from that checkpoint"
        )
      self.window.append(metrics)
    self.pending = []

  def _train_record(self, step: int) -> dict[str, Any]:
    self._fetch()
    window, elapsed = self.window, time.time() - self.timer_start
    nll = sum(float(m["nll"]) for m in window)
    tokens = sum(float(m["tokens"]) for m in window)
    record = {
      "step": step,
      "train_loss": nll / max(tokens, 1.0),
      "learning_rate": float(window[-1]["learning_rate"]),
      "grad_norm": float(window[-1]["grad_norm"]),
    }
    if "pos_nll" in window[-1]:
      record["train_loss_by_position"] = trainer.by_position(
        sum(m["pos_nll"] for m in window), sum(m["pos_tokens"] for m in window)
      )
    if self.timer_steps > 0 and elapsed > 0:
      self.train_seconds += elapsed
      self.timed_steps += self.timer_steps
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
    try:
      self.checkpointer.save(
        step,
        state["params"],
        {"step": state["step"], "opt_state": state["opt_state"]},
        self.run.train_iter,
      )
    except Exception as e:  # a run never trains on after a failed save
      last = (
        "no checkpoint was saved"
        if self.last_good_step is None
        else f"the last good checkpoint is step {self.last_good_step}"
      )
      raise CheckpointSaveError(
        f"saving the checkpoint of step {step} in {self.checkpointer.directory} failed "
        f"({type(e).__name__}: {e}); the run stops ({last})"
      ) from e
    self.last_good_step = step
    if jax.process_index() == 0:
      logging.info("checkpoint saved at step %d (%s)", step, self.checkpointer.directory)

  def _log(self, step: int, record: dict[str, Any]) -> None:
    """One line a person can follow in a log file (no terminal needed)."""
    if jax.process_index() != 0:
      return
    if "train_loss" in record:
      if self.timed_steps:
        per_step = self.train_seconds / self.timed_steps
        timing = (
          f"{record.get('tokens_per_s', 0.0):,.0f} tokens/s, elapsed "
          f"{_duration(self.train_seconds)}, ETA {_duration(per_step * (self.cfg.steps - step))}"
        )
      else:
        timing = "compiling done"
      logging.info(
        "step %d/%d: train loss %.4f, learning rate %.3g, %s",
        step,
        self.cfg.steps,
        record["train_loss"],
        record["learning_rate"],
        timing,
      )
    if "eval_loss" in record:
      logging.info(
        "eval at step %d: loss %.4f, perplexity %.2f",
        step,
        record["eval_loss"],
        record["eval_perplexity"],
      )

  def _next_batch(self) -> dict[str, jax.Array]:
    return _global_batch(
      next(self.run.train_iter), self.run.fns.train_batch_sharding, self.cfg.grad_accum
    )

  def _initial_eval(self, progress=None) -> None:
    """A fresh run evaluates once before its first update (step 0 in
    metrics.jsonl), so the starting point of a fine-tune or uptrain is on its
    curve. The eval step is a pure function of the parameters: the state, the
    RNG and the data iterator are untouched. A resumed run keeps the record
    of its first attempt and does not repeat it."""
    self.last_eval = (
      0,
      trainer.evaluate(self.run.fns, self.state["params"], self.run.eval_batches),
    )
    record = {"step": 0, **self.last_eval[1]}
    self.writer.write(record)
    self._log(0, record)
    if progress is not None:
      progress.set_postfix({"eval_loss": f"{record['eval_loss']:.3f}"})

  def __call__(self, progress=None) -> Optional[int]:
    """Trains to cfg.steps; returns the step it stopped at early, or None."""
    cfg, fns = self.cfg, self.run.fns
    with contextlib.ExitStack() as stack:
      stop_request = self.stop_request or stack.enter_context(run_utils.StopRequest())
      if self.start_step == 0:
        self._initial_eval(progress)
      for step in range(self.start_step + 1, cfg.steps + 1):
        self.state, metrics = fns.train_step(self.state, self._next_batch(), self.run.hyperparams)
        self.pending.append((step, metrics))
        if step == self.start_step + 1:  # the first step includes compilation: time from its end
          jax.block_until_ready(metrics)
          stop_request.ready()  # from now on a stop signal checkpoints first
          self._reset_timer()
          if progress is not None:  # the bar's rate and ETA leave the compile out
            progress.update(1)
            progress.initial, progress.start_t = progress.n, time.time()
        else:
          self.timer_steps += 1
          if progress is not None:
            progress.update(1)

        evaluate = step % cfg.eval_every == 0 or step == cfg.steps
        record = self._train_record(step) if step % cfg.log_every == 0 or evaluate else {}
        if evaluate:
          self.last_eval = (
            step,
            trainer.evaluate(fns, self.state["params"], self.run.eval_batches),
          )
          record.update(self.last_eval[1])
        if record:
          self.writer.write(record)
          self._log(step, record)
          if progress is not None:
            progress.set_postfix(
              {k: f"{record[k]:.3f}" for k in ("train_loss", "eval_loss") if k in record}
            )
        preempted = stop_request.should_stop(
          step, sync_point=bool(record) or step % cfg.checkpoint.every == 0
        )
        stop = preempted or step == cfg.stop_at_step
        if step % cfg.checkpoint.every == 0 or step == cfg.steps or stop:
          self._save(step)
        if record or stop:  # evals and saves do not count as training time
          self._reset_timer()
        if stop:
          logging.warning(
            "stopping at step %d (%s); checkpoint saved in %s",
            step,
            (
              "SIGTERM"
              if stop_request.requested.is_set()
              else "SIGTERM or preemption on another host"
            )
            if preempted
            else "train.stop_at_step",
            self.checkpointer.directory,
          )
          return step
      self._fetch()
    return None


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def initial_state(
  fns: trainer.StepFunctions, model_config: config_lib.ModelConfig, cfg: TrainConfig
) -> dict[str, Any]:
  """The state of a fresh run: a random init, or with `cfg.init_from` the
  parameters of that model, placed on the random init's shardings (the
  optimizer state, zeros, does not depend on the parameter values)."""
  state = fns.init(jax.random.key(cfg.seed))
  if cfg.init_from:
    from bt_jax.convert import init_params_from  # pylint: disable=g-import-not-at-top

    loaded = init_params_from(cfg.init_from, model_config, fns.abstract_state["params"])
    state = dict(
      state,
      params=jax.tree.map(
        lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
        loaded,
        state["params"],
      ),
    )
    logging.info("initialised the parameters from %s", cfg.init_from)
  return state


def _claim_workdir(
  workdir: str,
  model_config: config_lib.ModelConfig,
  cfg: TrainConfig,
  operative_config: Optional[str],
  start_over: bool,
  stack: contextlib.ExitStack,
) -> str:
  """One writer and one run per workdir (`bt_jax.workdir`): refuses, changing
  nothing, a workdir held by a live run or holding another run; with
  `start_over` the other run's files are moved aside (kept) instead."""
  workdir = _check_workdir(workdir)
  if jax.process_index() != 0:
    return workdir
  model_json = checkpointing.model_config_to_json(resolve_model_config(model_config, cfg))

  def check():
    if start_over:
      if workdir_lib.run_differences(workdir, model_json, operative_config):
        workdir_lib.move_run_aside(workdir)
    else:
      workdir_lib.check_same_run(workdir, model_json, operative_config)

  check()  # read-only: a refused run leaves the workdir as it was
  stack.enter_context(workdir_lib.WorkdirLock(workdir))
  check()  # again under the lock: another run may have started meanwhile
  return workdir


def train_and_evaluate(
  workdir: str,
  model_config: config_lib.ModelConfig,
  cfg: TrainConfig,
  *,
  operative_config: Optional[str] = None,
  start_over: bool = False,
  exit_before_first_step: bool = False,
) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the summary (also written to summary.json).

  The workdir belongs to one run (`bt_jax.workdir`): a workdir that a live run
  holds, or whose model_config.json / config.gin differ from this run's in
  anything but the resumable settings, is refused with WorkdirError (nothing
  changed); `start_over` moves the other run's files aside instead. Resuming
  restores the newest checkpoint that restores cleanly (damaged steps are moved
  to checkpoints_damaged/). SIGTERM or Ctrl-C checkpoints and returns; with
  `exit_before_first_step` (the binary) one before the first step (start-up,
  restore, the first compile: nothing new to save) ends the process at once.

  Returns early, after checkpointing, when SIGTERM arrives or at `stop_at_step`;
  the summary then has "stopped_at" and no final eval (and is not written).
  Raises NonFiniteLossError when the loss or gradient norm becomes NaN/inf, and
  CheckpointSaveError when a save fails.
  """
  with contextlib.ExitStack() as stack:
    stop_request = stack.enter_context(
      run_utils.StopRequest(exit_before_ready=exit_before_first_step)
    )
    workdir = _claim_workdir(workdir, model_config, cfg, operative_config, start_over, stack)
    return _train_and_evaluate(workdir, model_config, cfg, operative_config, stop_request)


def _train_and_evaluate(
  workdir: str,
  model_config: config_lib.ModelConfig,
  cfg: TrainConfig,
  operative_config: Optional[str],
  stop_request: run_utils.StopRequest,
) -> dict[str, Any]:
  """train_and_evaluate in a claimed workdir, with the stop request already listening."""
  start_time = time.time()
  run = _prepare(workdir, model_config, cfg, operative_config)
  fns, is_main = run.fns, jax.process_index() == 0
  checkpointer = checkpointing.Checkpointer(
    run.workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
  )
  steps = workdir_lib.existing_steps(checkpointer.directory)
  if not steps:
    latest = None
    state, start_step = initial_state(fns, run.model_config, cfg), 0
  else:
    abstract = fns.abstract_state

    def restore(step):
      return checkpointer.restore(
        step,
        abstract["params"],
        {"step": abstract["step"], "opt_state": abstract["opt_state"]},
        data_iterator=run.train_iter,
      )

    latest, (params, train_state) = workdir_lib.restore_newest_good(
      checkpointer.directory, steps, restore, move_aside=is_main
    )
    if latest != max(steps):  # damaged steps were moved aside: reopen on what is left
      checkpointer.close()
      checkpointer = checkpointing.Checkpointer(
        run.workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
      )
    state = {"step": train_state["step"], "params": params, "opt_state": train_state["opt_state"]}
    start_step = int(jax.device_get(state["step"]))
    logging.info("resumed from %s at step %d", checkpointer.directory, start_step)
  logging.info(
    "%s model, %s parameters; mesh %s; %d steps of %d x %d tokens",
    run.model_config.kind,
    f"{run.num_params:,}",
    dict(run.mesh.shape),
    cfg.steps,
    cfg.batch_size,
    run.seq_len,
  )

  # A fresh run drops every record an attempt without a checkpoint left (its step-0 eval too).
  writer = run_utils.MetricWriter(run.workdir, start_step if latest is not None else -1, is_main)
  progress = None
  if is_main and cfg.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    progress = tqdm(
      total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
    )
  loop = _Loop(run, checkpointer, writer, state, start_step, latest, stop_request)
  try:
    stopped_at = loop(progress)
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    checkpointer.close()

  state = loop.state
  final_step = int(jax.device_get(state["step"]))
  summary: dict[str, Any] = {
    "model": run.model_config.kind,
    "num_params": int(run.num_params),
    "steps": cfg.steps,
    "step": final_step,
  }
  if loop.rates:
    summary["tokens_per_s"] = float(np.median(loop.rates))
  if stopped_at is not None:
    summary["stopped_at"] = stopped_at
    summary["wall_s"] = time.time() - start_time
    return summary
  if loop.last_eval is not None and loop.last_eval[0] == final_step:
    final = loop.last_eval[1]
  else:
    final = trainer.evaluate(fns, state["params"], run.eval_batches)
  summary["final_eval_loss"] = final["eval_loss"]
  summary["final_eval_perplexity"] = final["eval_perplexity"]
  if "eval_loss_by_position" in final:
    summary["final_eval_loss_by_position"] = final["eval_loss_by_position"]
  summary["unigram_entropy"] = _unigram_entropy(
    run.train_tokens, run.eval_np, run.model_config, cfg
  )
  summary["final_eval_loss_vs_unigram"] = summary["final_eval_loss"] / summary["unigram_entropy"]
  summary["wall_s"] = time.time() - start_time
  if is_main:
    checkpointing.write_text_atomic(
      os.path.join(run.workdir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n"
    )
  logging.info(
    "final eval loss %.4f nats (unigram %.4f); summary in %s",
    summary["final_eval_loss"],
    summary["unigram_entropy"],
    os.path.join(run.workdir, SUMMARY_FILE),
  )
  return summary


def _unigram_entropy(train_tokens, eval_np, model_config, cfg: TrainConfig) -> float:
  """Unigram cross-entropy on exactly the validation targets the eval loss scores."""
  length = eval_np[0]["tokens"].shape[1]
  scorable = (np.arange(length) >= model_config.first_scored_position)[None, :]
  valid = [
    {"tokens": b["tokens"], "mask": ((b["mask"] > 0) & scorable).astype(np.int32)} for b in eval_np
  ]
  train = (train_tokens[i] for i in range(min(len(train_tokens), cfg.data.unigram_max_docs)))
  return data_lib.unigram_cross_entropy(train, valid, model_config.vocab_size)


# ---------------------------------------------------------------------------
# The binary: flags and gin at the edge.

# The sub-configs are built from their own gin names (`optimizer.learning_rate
# = ...`), not bound through `train.optimizer`.
GinTrainConfig = gin.external_configurable(
  TrainConfig, "train", denylist=["optimizer", "data", "checkpoint"]
)
GinOptimizerConfig = gin.external_configurable(optim.OptimizerConfig, "optimizer")
GinDataConfig = gin.external_configurable(DataConfig, "data")
GinCheckpointConfig = gin.external_configurable(CheckpointConfig, "checkpoint")


def train_config_from_gin() -> TrainConfig:
  """The TrainConfig bound by the parsed gin config: `train.*` with its
  `optimizer.*`, `data.*` and `checkpoint.*` sub-configs."""
  return GinTrainConfig(
    optimizer=GinOptimizerConfig(), data=GinDataConfig(), checkpoint=GinCheckpointConfig()
  )


def define_flags() -> None:
  """The binary's flags. Defined only when run as a program, so that importing
  this module (for its gin configurables) never clashes with other binaries'
  flags of the same name (--workdir)."""
  flags.DEFINE_multi_string("gin_file", [], "Gin files (gin_configs/ is on the search path).")
  flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'train.steps = 100'.")
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for multi-host runs (default: $JAX_COORDINATOR_ADDRESS).",
  )
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
  flags.DEFINE_bool(
    "start_over",
    False,
    "If --workdir holds another run, move its files aside "
    "(into WORKDIR/replaced-<time>/) and start from scratch; without it such a "
    "workdir is refused.",
  )
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with auto-detected settings (Cloud TPU pods, SLURM, ...).",
  )


def configs_from_gin(gin_files: Sequence[str], gin_params: Sequence[str]):
  """(model config, TrainConfig, operative config str) from gin files and bindings."""
  gin_utils.parse_gin(gin_files, gin_params)
  try:
    model_config = gin_utils.model()
  except Exception as e:
    raise ValueError(
      f"gin files {list(gin_files)} do not define a valid model (model.config): {e}"
    ) from e
  try:
    train_config = train_config_from_gin()
  except Exception as e:
    raise ValueError(
      f"invalid train config from gin files {list(gin_files)} and bindings {list(gin_params)}: {e}"
    ) from e
  return model_config, train_config, gin.operative_config_str()


def maybe_initialize_distributed(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  auto: bool = False,
) -> bool:
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator_address is None and not auto:
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --gin_file / --gin_param")
  if not FLAGS.workdir:
    raise cli.UserError("--workdir is required")
  if not FLAGS.gin_file:
    raise cli.UserError("--gin_file is required (e.g. --gin_file=gin_configs/runs/quickstart.gin)")
  maybe_initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
  )
  try:
    model_config, train_config, operative = configs_from_gin(FLAGS.gin_file, FLAGS.gin_param)
  except (FileNotFoundError, ValueError) as e:  # a bad config: one line, exit status 2
    raise cli.UserError(str(e)) from e
  try:
    summary = train_and_evaluate(
      FLAGS.workdir,
      model_config,
      train_config,
      operative_config=operative,
      start_over=FLAGS.start_over,
      exit_before_first_step=True,
    )
  except (NonFiniteLossError, CheckpointSaveError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  define_flags()
  logging_utils.quiet_orbax_logs()
  cli.run(lambda _: main([sys.argv[0]]))  # --help exits 0; stray arguments are user errors
