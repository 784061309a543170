"""Training a draft head on a frozen base model (spec "Training").

Teacher forcing on token batches (`teacher_forcing_loss`); for distillation
(the paper's recipe, about +10% tokens per step) the batches are the base
model's own greedy continuations: `distillation_batches` makes them with
`bt_jax.inference.generate`. AdamW with linear warmup (10%) and cosine decay,
as released (lr 1e-3).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from bt_jax.inference import generate
from bt_jax.models.vanilla import VanillaLM
from bt_jax.redrafter.drafter import DrafterConfig, DraftHead, init_drafter, teacher_forcing_loss


def make_optimizer(learning_rate: float, steps: int, weight_decay: float = 0.0,
                   warmup_fraction: float = 0.1) -> optax.GradientTransformation:
  warmup = max(1, int(round(warmup_fraction * steps)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))
  return optax.adamw(schedule, weight_decay=weight_decay)


@functools.lru_cache(maxsize=8)
def _train_step(model: VanillaLM, drafter: DraftHead, learning_rate: float, steps: int):
  """(optimizer, jitted step): cached on hashable settings, so a second run
  with the same model, drafter and schedule compiles nothing new."""
  optimizer = make_optimizer(learning_rate, steps)

  def step(drafter_params, opt_state, params, tokens, mask):
    hidden = model.apply({"params": params}, tokens, method=VanillaLM.hidden_states)
    embed_table = params["token_embed"]["embedding"]
    (loss, aux), grads = jax.value_and_grad(teacher_forcing_loss, argnums=1, has_aux=True)(
        drafter, drafter_params, hidden, embed_table, tokens, mask)
    updates, opt_state = optimizer.update(grads, opt_state, drafter_params)
    return optax.apply_updates(drafter_params, updates), opt_state, loss, aux
  return optimizer, jax.jit(step, donate_argnums=(0, 1))


def train_drafter(model: VanillaLM, params, drafter: DraftHead,
                  batches: Iterable[tuple[np.ndarray, np.ndarray]], *, steps: int,
                  learning_rate: float = 1e-3, seed: int = 0, drafter_params: Any = None,
                  progress: bool = True) -> tuple[Any, list[dict]]:
  """Trains the draft head for `steps` batches of (tokens [B, T], mask [B, T]).

  The base model's params are not updated (its hidden states are computed
  and cut from the gradient). Returns (drafter_params, per-step metrics:
  loss, and loss / top-1 accuracy of each draft step).
  """
  if steps < 1:
    raise ValueError(f"steps must be positive; got {steps}")
  if drafter_params is None:
    drafter_params = init_drafter(drafter, jax.random.key(seed))
  optimizer, step_fn = _train_step(model, drafter, float(learning_rate), int(steps))
  opt_state = optimizer.init(drafter_params)
  metrics = []   # device arrays: read once at the end, so no step waits on the host
  iterator = iter(batches)
  for i in tqdm(range(steps), desc="drafter", disable=not progress, unit="step"):
    try:
      tokens, mask = next(iterator)
    except StopIteration:
      raise ValueError(f"the batches ran out after {i} of {steps} steps") from None
    drafter_params, opt_state, loss, aux = step_fn(drafter_params, opt_state, params,
                                                   jnp.asarray(tokens), jnp.asarray(mask))
    metrics.append((loss, aux["loss_i"], aux["acc_i"]))
  history = [{"step": i + 1, "loss": float(loss), "loss_i": loss_i.tolist(),
              "acc_i": acc_i.tolist()}
             for i, (loss, loss_i, acc_i) in enumerate(jax.device_get(metrics))]
  return drafter_params, history


def distill_drafter(model: VanillaLM, params, tokenizer, documents: Sequence[str], *,
                    draft_len: int, num_prompts: int, prompt_len: int, continuation_len: int,
                    batch_size: int, steps: int, learning_rate: float, seed: int = 0,
                    progress: bool = True) -> tuple[DraftHead, Any, list[dict]]:
  """The distillation recipe end to end: `num_prompts` windows of `prompt_len`
  tokens from `documents`, the base model's greedy continuations of
  `continuation_len` tokens (stopping at the tokenizer's EOS), then
  `train_drafter`. Returns (drafter, drafter_params, history)."""
  drafter = DraftHead(DrafterConfig.for_base(model.config, draft_len=draft_len))
  rng = np.random.default_rng(seed)
  prompts = corpus_windows(tokenizer, documents, num_prompts, prompt_len, rng)
  batches = distillation_batches(model, params, prompts, continuation_len=continuation_len,
                                 batch_size=batch_size, seed=seed,
                                 eos_id=getattr(tokenizer, "eos_id", None))
  drafter_params, history = train_drafter(model, params, drafter, batches, steps=steps,
                                          learning_rate=learning_rate, seed=seed,
                                          progress=progress)
  return drafter, drafter_params, history


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


def distillation_batches(model: VanillaLM, params, prompts: Sequence[Sequence[int]], *,
                         continuation_len: int, batch_size: int, seed: int = 0,
                         eos_id: Optional[int] = None):
  """Endless batches of prompt + the base model's greedy continuation
  (tokens, mask) [batch_size, max prompt + continuation_len], right-padded;
  the continuations are generated once, then batches are drawn at random."""
  out = generate(model, params, prompts, max_new_tokens=continuation_len, eos_id=eos_id)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  rows = [list(p) + tokens[i, :lengths[i]].tolist() for i, p in enumerate(prompts)]
  width = max(len(r) for r in rows)
  data = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    data[i, :len(row)] = row
    mask[i, :len(row)] = 1
  rng = np.random.default_rng(seed)
  while True:
    pick = rng.choice(len(rows), size=batch_size, replace=len(rows) < batch_size)
    yield data[pick], mask[pick]
