"""Training a draft head on a frozen base model (ReDrafter, arXiv
2403.09919, section 3.4; apple/ml-recurrent-drafter's training script).

Two recipes (`distill_drafter(recipe=...)`):

- "distill", the paper's: the batches are the base model's own greedy
  continuations of corpus prompts (`DistillationData.generate`), the targets
  only the generated tokens (the prompt is corpus text, not the base
  model's), and the loss, by default, the KL divergence from the base
  model's distribution of each target token at a temperature
  (`Objective(loss="kl")`); loss="hard" is the cross-entropy against its
  greedy tokens;
- "teacher_forcing", the released code's: corpus text windows, every
  position a target, cross-entropy against the text.

Both hold out a fraction of the rows and report the drafter's top-1 and
top-k accuracy per draft step on them (`heldout_acc_i`, `heldout_topk_i`).
AdamW with linear warmup (10%) and cosine decay
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

RECIPES = ("distill", "teacher_forcing")
LOSSES = ("kl", "hard")


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the drafter is trained against: loss "hard" (cross-entropy
  against the batch's tokens) or "kl" (temperature**2 * KL from the base
  model's distribution at `temperature`, the paper's distillation);
  top_k: the k of the top-k accuracy reported."""

  loss: str = "hard"
  temperature: float = 1.0
  top_k: int = 4

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"the drafter loss must be one of {LOSSES}; got {self.loss!r}")
    if not self.temperature > 0:
      raise ValueError(f"the distillation temperature must be positive; got {self.temperature}")
    if self.top_k < 1:
      raise ValueError(f"top_k must be positive; got {self.top_k}")


def _objective_loss(
  model: VanillaLM,
  drafter: DraftHead,
  objective: Objective,
  drafter_params,
  params,
  tokens,
  mask,
  target_mask,
):
  """(loss, aux) of `teacher_forcing_loss` on one batch; the frozen base
  model's hidden states (and logits, for "kl") computed here."""
  hidden = model.apply({"params": params}, tokens, method=VanillaLM.hidden_states)
  head = params["lm_head"]["kernel"]
  teacher = jnp.dot(hidden, head.astype(hidden.dtype)) if objective.loss == "kl" else None
  return teacher_forcing_loss(
    drafter,
    drafter_params,
    hidden,
    params["token_embed"]["embedding"],
    tokens,
    mask,
    base_head=head if drafter.config.lm_head == "base" else None,
    target_mask=target_mask,
    teacher_logits=teacher,
    temperature=objective.temperature,
    top_k=objective.top_k,
  )


@functools.lru_cache(maxsize=8)
def _eval_step(model: VanillaLM, drafter: DraftHead, objective: Objective):
  """Jitted f(drafter_params, params, tokens, mask, target_mask) -> aux."""

  def evaluate(drafter_params, params, tokens, mask, target_mask):
    return _objective_loss(
      model, drafter, objective, drafter_params, params, tokens, mask, target_mask
    )[1]

  return jax.jit(evaluate)


@functools.lru_cache(maxsize=8)
def _train_step(
  model: VanillaLM,
  drafter: DraftHead,
  learning_rate: float,
  steps: int,
  objective: Objective = Objective(),
):
  """(optimizer, jitted step): cached on hashable settings, so a second run
  with the same model, drafter and schedule compiles nothing new."""
  optimizer = drafter_optimizer(learning_rate, steps)

  def step(drafter_params, opt_state, params, tokens, mask, target_mask):
    loss_fn = functools.partial(_objective_loss, model, drafter, objective)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      drafter_params, params, tokens, mask, target_mask
    )
    updates, opt_state = optimizer.update(grads, opt_state, drafter_params)
    return optax.apply_updates(drafter_params, updates), opt_state, loss, aux

  return optimizer, jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass
class DrafterTrainResult:
  """params: the drafter's params after the last step run; history: a record
  per step run in this call (step, loss, loss_i and acc_i per draft step;
  at evaluation steps heldout_loss_i, heldout_acc_i, heldout_topk_i);
  start_step: the step resumed from (0 for a fresh run); stopped_at: the step
  a SIGTERM or `stop_at_step` stopped at (checkpointed), or None when the
  run reached `steps`."""

  params: Any
  history: list[dict]
  start_step: int = 0
  stopped_at: Optional[int] = None


def train_drafter(
  model: VanillaLM,
  params,
  drafter: DraftHead,
  batches: Iterable[tuple[np.ndarray, ...]],
  *,
  steps: int,
  learning_rate: float = 1e-3,
  seed: int = 0,
  drafter_params: Any = None,
  progress: bool = True,
  objective: Objective = Objective(),
  heldout: Optional["DistillationData"] = None,
  eval_every: int = 100,
) -> tuple[Any, list[dict]]:
  """Trains the draft head for `steps` batches of (tokens [B, T], mask [B, T])
  or (tokens, mask, target_mask), in memory (`run_drafter_training`
  checkpoints and resumes).

  The base model's params are not updated (its hidden states are computed
  and cut from the gradient). Returns (drafter_params, per-step metrics:
  loss, and loss / top-1 accuracy of each draft step).
  """
  result = run_drafter_training(
    model,
    params,
    drafter,
    batches,
    steps=steps,
    learning_rate=learning_rate,
    seed=seed,
    drafter_params=drafter_params,
    progress=progress,
    objective=objective,
    heldout=heldout,
    eval_every=eval_every,
  )
  return result.params, result.history


def _abstract(tree: Any) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def run_drafter_training(
  model: VanillaLM,
  params,
  drafter: DraftHead,
  batches,
  *,
  steps: int,
  learning_rate: float = 1e-3,
  seed: int = 0,
  drafter_params: Any = None,
  progress: bool = True,
  checkpoint_dir: Optional[str] = None,
  checkpoint_every: int = 100,
  keep_checkpoints: Optional[int] = 2,
  stop_at_step: Optional[int] = None,
  stop_request: Optional[run_utils.StopRequest] = None,
  metrics_writer: Optional[run_utils.MetricWriter] = None,
  objective: Objective = Objective(),
  heldout: Optional["DistillationData"] = None,
  eval_every: int = 100,
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

  objective: the loss (`Objective`). heldout: rows never trained on; every
  `eval_every` steps and at the last step the record also has the loss,
  top-1 and top-k accuracy per draft step on them (heldout_loss_i,
  heldout_acc_i, heldout_topk_i).
  """
  if eval_every < 1:
    raise ValueError(f"eval_every must be positive; got {eval_every}")
  if steps < 1:
    raise ValueError(f"steps must be positive; got {steps}")
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be positive; got {checkpoint_every}")
  if drafter_params is None:
    drafter_params = init_drafter(drafter, jax.random.key(seed))
  optimizer, step_fn = _train_step(model, drafter, float(learning_rate), int(steps), objective)
  eval_fn = _eval_step(model, drafter, objective)
  eval_batches = (
    []
    if heldout is None
    else [tuple(jnp.asarray(a) for a in batch) for batch in heldout.eval_batches()]
  )

  def evaluate(drafter_params):
    """Per-step means over the held-out rows (weighted by target counts)."""
    sums, count = None, 0.0
    for batch in eval_batches:
      aux = eval_fn(drafter_params, params, *batch)
      weighted = {k: aux[k] * aux["count_i"] for k in ("loss_i", "acc_i", "topk_i")}
      sums = weighted if sums is None else {k: sums[k] + weighted[k] for k in sums}
      count = count + aux["count_i"]
    return {f"heldout_{k}": v / jnp.maximum(count, 1.0) for k, v in sums.items()}

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
        latest,
        _abstract(drafter_params),
        {"step": _abstract(jnp.int32(0)), "opt_state": _abstract(opt_state)},
      )
      opt_state, start_step = train_state["opt_state"], int(train_state["step"])
  if callable(batches):
    iterator = iter(batches(start_step))
  elif start_step:
    checkpointer.close()
    raise ValueError(
      f"resuming from step {start_step} needs batches as a function of the start "
      "step; got an iterable"
    )
  else:
    iterator = iter(batches)

  history, pending = [], []  # pending: device arrays, read only at save points

  def flush():
    records = []
    for step, (loss, loss_i, acc_i, extra) in zip(
      [s for s, _ in pending], jax.device_get([m for _, m in pending])
    ):
      records.append(
        {
          "step": step,
          "loss": float(loss),
          "loss_i": loss_i.tolist(),
          "acc_i": acc_i.tolist(),
          **{k: v.tolist() for k, v in extra.items()},
        }
      )
    history.extend(records)
    if metrics_writer is not None:
      metrics_writer.write_many(records)
    pending.clear()

  stopped_at = None
  with contextlib.ExitStack() as cleanup:
    if checkpointer is not None:
      cleanup.callback(checkpointer.close)  # waits for the last save
      if stop_request is None:  # SIGTERM is caught only with a checkpoint to save
        stop_request = cleanup.enter_context(run_utils.StopRequest())
    bar = cleanup.enter_context(
      tqdm(total=steps, initial=start_step, desc="drafter", disable=not progress, unit="step")
    )
    for step in range(start_step + 1, steps + 1):
      try:
        batch = next(iterator)
      except StopIteration:
        raise ValueError(f"the batches ran out after {step - 1} of {steps} steps") from None
      tokens, mask = batch[:2]
      target_mask = batch[2] if len(batch) > 2 else mask
      drafter_params, opt_state, loss, aux = step_fn(
        drafter_params,
        opt_state,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(target_mask),
      )
      extra = (
        evaluate(drafter_params)
        if eval_batches and (step % eval_every == 0 or step == steps)
        else {}
      )
      pending.append((step, (loss, aux["loss_i"], aux["acc_i"], extra)))
      bar.update(1)
      stop = step == stop_at_step or (
        checkpointer is not None
        and stop_request.should_stop(step, sync_point=step % checkpoint_every == 0)
      )
      if checkpointer is not None and (step % checkpoint_every == 0 or step == steps or stop):
        flush()
        checkpointer.save(step, drafter_params, {"step": jnp.int32(step), "opt_state": opt_state})
      if stop:
        stopped_at = step
        logging.warning(
          "drafter training stopping at step %d (%s)%s",
          step,
          "stop_at_step" if step == stop_at_step else "SIGTERM",
          f"; checkpoint saved in {checkpointer.directory}" if checkpointer else "",
        )
        break
    flush()
  return DrafterTrainResult(drafter_params, history, start_step, stopped_at)


def distill_drafter(
  model: VanillaLM,
  params,
  tokenizer,
  documents: Sequence[str],
  *,
  draft_len: int,
  num_prompts: int,
  prompt_len: int,
  continuation_len: int,
  batch_size: int,
  steps: int,
  learning_rate: float,
  seed: int = 0,
  progress: bool = True,
  run_dir: Optional[str] = None,
  recipe: str = "distill",
  objective: Optional[Objective] = None,
  heldout_fraction: float = 0.1,
  eval_every: int = 100,
  drafter_options: Optional[dict] = None,
  **run_options,
) -> tuple[DraftHead, DrafterTrainResult]:
  """A drafter recipe end to end, then `run_drafter_training`.

  recipe "distill" (the paper's): `num_prompts` windows of `prompt_len`
  tokens from `documents`, the base model's greedy continuations of
  `continuation_len` tokens (stopping at the tokenizer's EOS), the targets
  only the continuations; objective default `Objective(loss="kl")`.
  recipe "teacher_forcing" (the released code's): windows of prompt_len +
  continuation_len tokens of the documents, every token a target, hard
  labels (the only objective: the text has no base-model distribution).
  The last `heldout_fraction` of the rows (at least one) is held out for
  the accuracy reported every `eval_every` steps. drafter_options:
  `DrafterConfig.for_base` arguments (recurrence, lm_head, exit_ratio,
  num_res_blocks). With `run_dir`, the texts are kept in
  run_dir/distill_data.npz (made once, reused on resume) and the training
  checkpoints there (`run_options`: checkpoint_every, keep_checkpoints,
  stop_at_step, stop_request, metrics_writer). Returns (drafter, result)."""
  if recipe not in RECIPES:
    raise ValueError(f"the drafter recipe must be one of {RECIPES}; got {recipe!r}")
  if objective is None:
    objective = Objective(loss="kl" if recipe == "distill" else "hard")
  if recipe == "teacher_forcing" and objective.loss != "hard":
    raise ValueError(
      "the teacher_forcing recipe trains on corpus text, which has no base-model "
      f"distribution: its loss is 'hard'; got {objective.loss!r}"
    )
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must be in (0, 1); got {heldout_fraction}")
  drafter = DraftHead(
    DrafterConfig.for_base(model.config, draft_len=draft_len, **(drafter_options or {}))
  )
  data_path = os.path.join(run_dir, DISTILL_DATA_FILE) if run_dir else None
  if data_path and os.path.exists(data_path):
    data = DistillationData.load(data_path)
  else:
    rng = np.random.default_rng(seed)
    if recipe == "distill":
      prompts = corpus_windows(tokenizer, documents, num_prompts, prompt_len, rng)
      data = DistillationData.generate(
        model,
        params,
        prompts,
        continuation_len=continuation_len,
        eos_id=getattr(tokenizer, "eos_id", None),
      )
    else:
      data = DistillationData.from_text(
        corpus_windows(tokenizer, documents, num_prompts, prompt_len + continuation_len, rng)
      )
    if data_path:
      os.makedirs(run_dir, exist_ok=True)
      data.save(data_path)
  train_data, heldout = data.split(heldout_fraction, batch_size)
  result = run_drafter_training(
    model,
    params,
    drafter,
    functools.partial(train_data.batches, batch_size, seed),
    steps=steps,
    learning_rate=learning_rate,
    seed=seed,
    progress=progress,
    checkpoint_dir=run_dir,
    objective=objective,
    heldout=heldout,
    eval_every=eval_every,
    **run_options,
  )
  return drafter, result


def corpus_windows(
  tokenizer, documents: Sequence[str], count: int, length: int, rng: np.random.Generator
) -> list[list[int]]:
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
    out.append(list(ids[start : start + length]))
  return out


DISTILL_DATA_FILE = "distill_data.npz"


@dataclasses.dataclass
class DistillationData:
  """Training texts, right-padded: tokens, mask (1 = a real token) and
  target_mask (1 = a token to learn: the base model's own continuation for
  distillation, every real token for text), int32 [rows, width]. `batch_size`
  of held-out rows per evaluation batch (set by `split`)."""

  tokens: np.ndarray
  mask: np.ndarray
  target_mask: Optional[np.ndarray] = None
  batch_size: int = 32

  def __post_init__(self):
    if self.target_mask is None:
      self.target_mask = self.mask

  @classmethod
  def generate(
    cls,
    model: VanillaLM,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    continuation_len: int,
    eos_id: Optional[int] = None,
  ) -> "DistillationData":
    """Prompt + the base model's greedy continuation per row; only the
    continuation is a target."""
    out = generate(model, params, prompts, max_new_tokens=continuation_len, eos_id=eos_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    rows = [list(p) + tokens[i, : lengths[i]].tolist() for i, p in enumerate(prompts)]
    data = cls._padded(rows)
    for i, prompt in enumerate(prompts):
      data.target_mask[i, : len(prompt)] = 0
    return data

  @classmethod
  def from_text(cls, rows: Sequence[Sequence[int]]) -> "DistillationData":
    """Text windows; every token a target (the released teacher-forcing recipe)."""
    data = cls._padded(rows)
    data.target_mask = data.mask.copy()
    return data

  @classmethod
  def _padded(cls, rows):
    width = max(len(r) for r in rows)
    data = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      data[i, : len(row)] = row
      mask[i, : len(row)] = 1
    return cls(data, mask, mask.copy())

  def split(
    self, heldout_fraction: float, batch_size: int
  ) -> tuple["DistillationData", "DistillationData"]:
    """(train rows, held-out rows): the last round(fraction * rows) rows,
    at least one, are held out (the rows are random windows already); both
    keep at least one row."""
    rows = len(self.tokens)
    if rows < 2:
      raise ValueError(f"holding out rows needs at least 2; got {rows}")
    held = min(rows - 1, max(1, int(round(heldout_fraction * rows))))
    part = lambda sl: DistillationData(
      self.tokens[sl], self.mask[sl], self.target_mask[sl], batch_size
    )
    return part(slice(0, rows - held)), part(slice(rows - held, rows))

  def save(self, path: str) -> None:
    """Atomically (a reader sees the old file or the whole new one)."""
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, tokens=self.tokens, mask=self.mask, target_mask=self.target_mask)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "DistillationData":
    with np.load(path) as f:
      if "target_mask" not in f:
        raise ValueError(
          f"{path} has no target_mask (made by a bt_jax before prompt positions "
          "were excluded from the targets); delete it to make the texts again"
        )
      return cls(f["tokens"], f["mask"], f["target_mask"])

  def batches(self, batch_size: int, seed: int = 0, start_step: int = 0):
    """Endless random batches (tokens, mask, target_mask) [batch_size, width],
    the same sequence for a seed; `start_step` skips that many (for a
    resumed run)."""
    rows = len(self.tokens)
    rng = np.random.default_rng(seed)
    draw = lambda: rng.choice(rows, size=batch_size, replace=rows < batch_size)
    for _ in range(start_step):
      draw()
    while True:
      pick = draw()
      yield self.tokens[pick], self.mask[pick], self.target_mask[pick]

  def eval_batches(self):
    """Every row once, in batches of `batch_size` (the last one shorter)."""
    for start in range(0, len(self.tokens), self.batch_size):
      sl = slice(start, start + self.batch_size)
      yield self.tokens[sl], self.mask[sl], self.target_mask[sl]


def distillation_batches(
  model: VanillaLM,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  continuation_len: int,
  batch_size: int,
  seed: int = 0,
  eos_id: Optional[int] = None,
):
  """Endless batches of prompt + the base model's greedy continuation
  (tokens, mask, target_mask) [batch_size, max prompt + continuation_len],
  right-padded, the prompts no targets; the continuations are generated
  once, then batches are drawn at random."""
  data = DistillationData.generate(
    model, params, prompts, continuation_len=continuation_len, eos_id=eos_id
  )
  return data.batches(batch_size, seed)
