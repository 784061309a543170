"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick a token from logits. Hashable: it is a static jit argument.

  temperature 0 is greedy (argmax); otherwise logits / temperature are
  restricted to the top_k largest (0: no limit) and then to the smallest set
  whose probability reaches top_p (1.0: no limit) before sampling.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def restrict_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p; excluded entries become -inf.

  logits [..., vocab] f32. Ties at the top-k threshold are all kept.
  """
  logits = logits.astype(jnp.float32) / sampling.temperature
  vocab = logits.shape[-1]
  if 0 < sampling.top_k < vocab:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token when the mass strictly above it is below top_p: the most
    # likely token is always kept.
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_above < sampling.top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return logits


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """logits [batch, vocab] -> token ids [batch] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  restricted = restrict_logits(logits, sampling)
  return jax.random.categorical(rng, restricted, axis=-1).astype(jnp.int32)
