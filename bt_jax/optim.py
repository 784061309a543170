"""Optimizers: AdamW with a warmup + cosine schedule, for pretraining and for
the ReDrafter draft head.

Pretraining (Block Transformer, Ho et al. 2024, arXiv:2406.02657, after
Pythia): AdamW (b1 0.9, b2 0.95, eps 1e-8), weight decay 0.1 on matrices and
embeddings, gradient clip 1.0, linear warmup then cosine decay to 10% of the
peak. Its hyperparameters reach the train step as traced scalars
(`OptimizerConfig.hyperparams`), so runs that differ only in learning rate,
schedule length or weight decay share one compiled step:

    hyperparams = OptimizerConfig(learning_rate=6e-4).hyperparams(total_steps=1000)
    tx = make_optimizer(hyperparams)        # inside the jitted step

The draft head (ReDrafter, docs/redrafter.md) trains with AdamW, warmup over
10% of the steps and cosine decay to zero, as released: `drafter_optimizer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + clipping + warmup/cosine schedule (gin name `optimizer`).

  The schedule's length is the run's (`hyperparams(total_steps)`), not a field.
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1  # on matrices and embeddings; not on biases and norms
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: Optional[float] = 1.0  # None: no clipping

  def __post_init__(self):
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(
        f"optimizer.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}"
      )
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ValueError(
        f"optimizer.clip_norm must be positive (or None: no clipping), got {self.clip_norm}"
      )

  def hyperparams(self, total_steps: int) -> dict[str, np.ndarray]:
    """The settings as f32 scalars for `make_optimizer` (clip_norm None -> inf)."""
    values = dataclasses.asdict(self)
    values["total_steps"] = total_steps
    if values["clip_norm"] is None:
      values["clip_norm"] = np.inf
    return {k: np.asarray(v, np.float32) for k, v in values.items()}


def warmup_cosine_schedule(hyperparams):
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


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and embeddings only (HF Trainer / GPT-NeoX habit):
  True for leaves of rank >= 2, False for biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(hyperparams) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with the warmup-cosine schedule and the
  weight-decay mask. `hyperparams` as from `OptimizerConfig.hyperparams()`
  (numbers or traced scalars); the state's structure does not depend on them."""
  hp = hyperparams
  return optax.chain(
    optax.clip_by_global_norm(hp["clip_norm"]),
    optax.adamw(
      warmup_cosine_schedule(hp),
      b1=hp["b1"],
      b2=hp["b2"],
      eps=hp["eps"],
      weight_decay=hp["weight_decay"],
      mask=decay_mask,
    ),
  )


def drafter_schedule(learning_rate: float, steps: int, warmup_fraction: float = 0.1):
  """The draft head's schedule: linear warmup from 0 over `warmup_fraction` of
  the steps (at least 1), then cosine decay to 0 at `steps`."""
  warmup = max(1, int(round(warmup_fraction * steps)))
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))


def drafter_optimizer(
  learning_rate: float, steps: int, weight_decay: float = 0.0, warmup_fraction: float = 0.1
) -> optax.GradientTransformation:
  """AdamW (optax defaults: b1 0.9, b2 0.999, eps 1e-8), no clipping, with
  `drafter_schedule`; weight decay (none by default) on every leaf."""
  return optax.adamw(
    drafter_schedule(learning_rate, steps, warmup_fraction), weight_decay=weight_decay
  )
