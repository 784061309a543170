"""Training a draft head on a frozen base model (spec "Training").

Teacher forcing on token batches (`teacher_forcing_loss`); for distillation
(the paper's recipe, about +10% tokens per step) the batches are the base
model's own greedy continuations: `distillation_batches` makes them with
`bt_jax.inference.generate`. AdamW with linear warmup (10%) and cosine decay
(`bt_jax.optim.drafter_optimizer`), as released (lr 1e-3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm.auto import tqdm

from bt_jax import checkpointing, run_utils
from bt_jax.inference import generate
from bt_jax.models.vanilla import VanillaLM
from bt_jax.optim import drafter_optimizer
from bt_jax.redrafter.drafter import DrafterConfig, DraftHead, init_drafter, teacher_forcing_loss


@functools.lru_cache(maxsize=8)
def _train_step(model: VanillaLM, drafter: DraftHead, learning_rate: float, steps: int):
  """(optimizer, jitted step): cached on hashable settings, so a second run
  with the same model, drafter and schedule compiles nothing new."""
  optimizer = drafter_optimizer(learning_rate, steps)

  def step(drafter_params, opt_state, params, tokens, mask):
    hidden = model.apply({"params": params}, tokens, method=VanillaLM.hidden_states)
    embed_table = params["token_embed"]["embedding"]
    (loss, aux), grads = jax.value_and_grad(teacher_forcing_loss, argnums=1, has_aux=True)(
        drafter, drafter_params, hidden, embed_table, tokens, mask)
    updates, opt_state = optimizer.update(grads, opt_state, drafter_params)
    return optax.apply_updates(drafter_params, updates), opt_state, loss, aux
  return optimizer, jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass
class DrafterTrainResult:
  """params: the drafter's params after the last step run; history: a record
  per step run in this call (step, loss, loss_i and acc_i per draft step);
  start_step: the step resumed from (0 for a fresh run); stopped_at: the step
  a SIGTERM or `stop_at_step` stopped at (checkpointed), or None when the
  run reached `steps`."""

  params: Any
  history: list[dict]
  start_step: int = 0
  stopped_at: Optional[int] = None


def train_drafter(model: VanillaLM, params, drafter: DraftHead,
                  batches: Iterable[tuple[np.ndarray, np.ndarray]], *, steps: int,
                  learning_rate: float = 1e-3, seed: int = 0, drafter_params: Any = None,
                  progress: bool = True) -> tuple[Any, list[dict]]:
  """Trains the draft head for `steps` batches of (tokens [B, T], mask [B, T]),
  in memory (`run_drafter_training` checkpoints and resumes).

  The base model's params are not updated (its hidden states are computed
  and cut from the gradient). Returns (drafter_params, per-step metrics:
  loss, and loss / top-1 accuracy of each draft step).
  """
  result = run_drafter_training(model, params, drafter, batches, steps=steps,
                                learning_rate=learning_rate, seed=seed,
                                drafter_params=drafter_params, progress=progress)
  return result.params, result.history


def _abstract(tree: Any) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def run_drafter_training(model: VanillaLM, params, drafter: DraftHead, batches, *, steps: int,
                         learning_rate: float = 1e-3, seed: int = 0, drafter_params: Any = None,
                         progress: bool = True, checkpoint_dir: Optional[str] = None,
                         checkpoint_every: int = 100, keep_checkpoints: Optional[int] = 2,
                         stop_at_step: Optional[int] = None,
                         stop_request: Optional[run_utils.StopRequest] = None,
                         metrics_writer: Optional[run_utils.MetricWriter] = None
                         ) -> DrafterTrainResult:
  """Trains the draft head, with checkpoints when `checkpoint_dir` is given.

  batches: an iterable of (tokens, mask), or a function start_step -> such
  an iterable positioned after `start_step` batches (needed to resume). With
  `checkpoint_dir` (orbax steps under checkpoint_dir/checkpoints: the
  drafter's params, the optimizer state and the step), the run resumes from
  the latest checkpoint there and continues exactly as an uninterrupted run;
  it saves every `checkpoint_every` steps, at `steps`, and when it stops
  early: at `stop_at_step`, or after the step during which SIGTERM arrived
  (`stop_request`, or one installed for the call). Metrics are read back from
  the device only at those points (and at the end), then written to
  `metrics_writer`.
  """
  if steps < 1:
    raise ValueError(f"steps must be positive; got {steps}")
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be positive; got {checkpoint_every}")
  if drafter_params is None:
    drafter_params = init_drafter(drafter, jax.random.key(seed))
  optimizer, step_fn = _train_step(model, drafter, float(learning_rate), int(steps))
  opt_state = optimizer.init(drafter_params)
  checkpointer, start_step = None, 0
  if checkpoint_dir is not None:
    checkpointer = checkpointing.Checkpointer(checkpoint_dir, keep=keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:
      if latest > steps:
        checkpointer.close()
        raise ValueError(f"{checkpointer.directory} holds step {latest}, past steps={steps}")
      drafter_params, train_state = checkpointer.restore(
          latest, _abstract(drafter_params), {"step": _abstract(jnp.int32(0)),
                                              "opt_state": _abstract(opt_state)})
      opt_state, start_step = train_state["opt_state"], int(train_state["step"])
  if callable(batches):
    iterator = iter(batches(start_step))
  elif start_step:
    checkpointer.close()
    raise ValueError(f"resuming from step {start_step} needs batches as a function of the start "
                     "step; got an iterable")
  else:
    iterator = iter(batches)

  history, pending = [], []   # pending: device arrays, read only at save points

  def flush():
    records = [{"step": step, "loss": float(loss), "loss_i": loss_i.tolist(),
                "acc_i": acc_i.tolist()}
               for step, (loss, loss_i, acc_i) in zip([s for s, _ in pending],
                                                      jax.device_get([m for _, m in pending]))]
    history.extend(records)
    if metrics_writer is not None:
      metrics_writer.write_many(records)
    pending.clear()

  stopped_at = None
  with contextlib.ExitStack() as cleanup:
    if checkpointer is not None:
      cleanup.callback(checkpointer.close)     # waits for the last save
      if stop_request is None:                 # SIGTERM is caught only with a checkpoint to save
        stop_request = cleanup.enter_context(run_utils.StopRequest())
    bar = cleanup.enter_context(tqdm(total=steps, initial=start_step, desc="drafter",
                                     disable=not progress, unit="step"))
    for step in range(start_step + 1, steps + 1):
      try:
        tokens, mask = next(iterator)
      except StopIteration:
        raise ValueError(f"the batches ran out after {step - 1} of {steps} steps") from None
      drafter_params, opt_state, loss, aux = step_fn(drafter_params, opt_state, params,
                                                     jnp.asarray(tokens), jnp.asarray(mask))
      pending.append((step, (loss, aux["loss_i"], aux["acc_i"])))
      bar.update(1)
      stop = step == stop_at_step or (checkpointer is not None and stop_request.should_stop(
          step, sync_point=step % checkpoint_every == 0))
      if checkpointer is not None and (step % checkpoint_every == 0 or step == steps or stop):
        flush()
        checkpointer.save(step, drafter_params, {"step": jnp.int32(step), "opt_state": opt_state})
      if stop:
        stopped_at = step
        logging.warning("drafter training stopping at step %d (%s)%s", step,
                        "stop_at_step" if step == stop_at_step else "SIGTERM",
                        f"; checkpoint saved in {checkpointer.directory}" if checkpointer else "")
        break
    flush()
  return DrafterTrainResult(drafter_params, history, start_step, stopped_at)


def distill_drafter(model: VanillaLM, params, tokenizer, documents: Sequence[str], *,
                    draft_len: int, num_prompts: int, prompt_len: int, continuation_len: int,
                    batch_size: int, steps: int, learning_rate: float, seed: int = 0,
                    progress: bool = True, run_dir: Optional[str] = None,
                    **run_options) -> tuple[DraftHead, DrafterTrainResult]:
  """The distillation recipe end to end: `num_prompts` windows of `prompt_len`
  tokens from `documents`, the base model's greedy continuations of
  `continuation_len` tokens (stopping at the tokenizer's EOS), then
  `run_drafter_training`. With `run_dir`, the texts are kept in
  run_dir/distill_data.npz (made once, reused on resume) and the training
  checkpoints there (`run_options`: checkpoint_every, keep_checkpoints,
  stop_at_step, stop_request, metrics_writer). Returns (drafter, result)."""
  drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=draft_len))
  data_path = os.path.join(run_dir, DISTILL_DATA_FILE) if run_dir else None
  if data_path and os.path.exists(data_path):
    data = DistillationData.load(data_path)
  else:
    rng = np.random.default_rng(seed)
    prompts = corpus_windows(tokenizer, documents, num_prompts, prompt_len, rng)
    data = DistillationData.generate(model, params, prompts, continuation_len=continuation_len,
                                     eos_id=getattr(tokenizer, "eos_id", None))
    if data_path:
      os.makedirs(run_dir, exist_ok=True)
      data.save(data_path)
  result = run_drafter_training(
      model, params, drafter, functools.partial(data.batches, batch_size, seed), steps=steps,
      learning_rate=learning_rate, seed=seed, progress=progress, checkpoint_dir=run_dir,
      **run_options)
  return drafter, result


def corpus_windows(tokenizer, documents: Sequence[str], count: int, length: int,
                   rng: np.random.Generator) -> list[list[int]]:
  """`count` random windows of `length` tokens from documents longer than that
  (prompts to distill on, or to evaluate with)."""
  encoded = []
  for i in rng.permutation(len(documents)):
    ids = tokenizer.encode(documents[int(i)])
    if len(ids) > length:
      encoded.append(ids)
    if len(encoded) >= max(8, count // 4):
      break
  if not encoded:
    raise ValueError(f"no document of the corpus has more than {length} tokens")
  out = []
  for _ in range(count):
    ids = encoded[rng.integers(len(encoded))]
    start = int(rng.integers(0, len(ids) - length))
    out.append(list(ids[start:start + length]))
  return out


DISTILL_DATA_FILE = "distill_data.npz"


@dataclasses.dataclass
class DistillationData:
  """Distillation texts: prompt + the base model's greedy continuation per
  row, right-padded: tokens and mask int32 [rows, width]."""

  tokens: np.ndarray
  mask: np.ndarray

  @classmethod
  def generate(cls, model: VanillaLM, params, prompts: Sequence[Sequence[int]], *,
               continuation_len: int, eos_id: Optional[int] = None) -> "DistillationData":
    out = generate(model, params, prompts, max_new_tokens=continuation_len, eos_id=eos_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    rows = [list(p) + tokens[i, :lengths[i]].tolist() for i, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    data = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      data[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return cls(data, mask)

  def save(self, path: str) -> None:
    """Atomically (a reader sees the old file or the whole new one)."""
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, tokens=self.tokens, mask=self.mask)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "DistillationData":
    with np.load(path) as f:
      return cls(f["tokens"], f["mask"])

  def batches(self, batch_size: int, seed: int = 0, start_step: int = 0):
    """Endless random batches (tokens, mask) [batch_size, width], the same
    sequence for a seed; `start_step` skips that many (for a resumed run)."""
    rows = len(self.tokens)
    rng = np.random.default_rng(seed)
    draw = lambda: rng.choice(rows, size=batch_size, replace=rows < batch_size)
    for _ in range(start_step):
      draw()
    while True:
      pick = draw()
      yield self.tokens[pick], self.mask[pick]


def distillation_batches(model: VanillaLM, params, prompts: Sequence[Sequence[int]], *,
                         continuation_len: int, batch_size: int, seed: int = 0,
                         eos_id: Optional[int] = None):
  """Endless batches of prompt + the base model's greedy continuation
  (tokens, mask) [batch_size, max prompt + continuation_len], right-padded;
  the continuations are generated once, then batches are drawn at random."""
  data = DistillationData.generate(model, params, prompts, continuation_len=continuation_len,
                                   eos_id=eos_id)
  return data.batches(batch_size, seed)
