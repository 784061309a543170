"""bt_jax.optim: the schedules' values, the weight-decay mask, the configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bt_jax import optim


def test_warmup_cosine_schedule_values():
  hp = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1).hyperparams(
    total_steps=110
  )
  schedule = optim.warmup_cosine_schedule(hp)
  # count = updates done: update count + 1 has the rate below.
  np.testing.assert_allclose(schedule(0), 1e-4, rtol=1e-6)  # the first update is not 0
  np.testing.assert_allclose(schedule(4), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(9), 1e-3, rtol=1e-6)  # peak at update warmup_steps
  np.testing.assert_allclose(schedule(59), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)  # half way down
  np.testing.assert_allclose(schedule(109), 1e-4, rtol=1e-5)  # min_lr_ratio * peak at the end
  np.testing.assert_allclose(schedule(500), 1e-4, rtol=1e-5)  # and after
  for count in (20, 35, 80):
    progress = (count + 1 - 10) / 100
    want = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * progress))
    np.testing.assert_allclose(schedule(count), want, rtol=1e-5)
  no_warmup = optim.warmup_cosine_schedule(
    optim.OptimizerConfig(learning_rate=2.0, warmup_steps=0).hyperparams(total_steps=4)
  )
  np.testing.assert_allclose(no_warmup(0), 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)


def test_hyperparams_are_f32_scalars_and_none_clip_is_inf():
  hp = optim.OptimizerConfig(clip_norm=None).hyperparams(total_steps=7)
  assert set(hp) == {
    "learning_rate",
    "warmup_steps",
    "total_steps",
    "min_lr_ratio",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip_norm",
  }
  assert all(v.dtype == np.float32 and v.shape == () for v in hp.values())
  assert hp["total_steps"] == 7 and np.isinf(hp["clip_norm"])


def test_decay_mask_is_matrices_and_embeddings_only():
  params = {
    "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    "norm": {"scale": jnp.ones(3)},
    "embed": {"embedding": jnp.ones((10, 4))},
    "stacked": jnp.ones((2, 4, 3)),
  }
  assert optim.decay_mask(params) == {
    "dense": {"kernel": True, "bias": False},
    "norm": {"scale": False},
    "embed": {"embedding": True},
    "stacked": True,
  }
  # One AdamW step with zero gradients moves only the decayed leaves.
  hp = optim.OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5).hyperparams(10)
  tx = optim.make_optimizer(hp)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == optim.decay_mask(params)


def test_drafter_optimizer_is_the_released_recipe():
  """The draft head's optimizer as it was written before it moved here: bit for bit."""
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3) / 3}
  for lr, steps in ((1e-3, 600), (3e-3, 6), (1e-2, 1)):
    warmup = max(1, int(round(0.1 * steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    old, new = optax.adamw(schedule, weight_decay=0.0), optim.drafter_optimizer(lr, steps)
    old_state, new_state = old.init(params), new.init(params)
    assert jax.tree.structure(old_state) == jax.tree.structure(new_state)
    for step in range(3):
      grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 1)), params)
      old_updates, old_state = old.update(grads, old_state, params)
      new_updates, new_state = new.update(grads, new_state, params)
      jax.tree.map(np.testing.assert_array_equal, old_updates, new_updates)
    for count in range(0, steps + 2):
      assert float(optim.drafter_schedule(lr, steps)(count)) == float(schedule(count))


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("learning_rate", 0.0, "optimizer.learning_rate must be positive"),
    ("warmup_steps", -1, "optimizer.warmup_steps must be a non-negative integer"),
    ("min_lr_ratio", 1.5, r"optimizer.min_lr_ratio=1.5 must be in \[0, 1\]"),
    ("clip_norm", 0.0, "optimizer.clip_norm must be positive"),
  ],
)
def test_bad_settings_name_the_gin_binding(field, value, message):
  with pytest.raises(ValueError, match=message):
    optim.OptimizerConfig(**{field: value})
