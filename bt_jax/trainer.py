"""The library half of training: the loss sums, the jitted init / train / eval
steps with their shardings, and the FLOP count behind the MFU estimate.
`bt_jax.train` (the binary) runs the loop over them.

    fns = step_functions(build_model(config), make_mesh((-1, 1, 1)), axes.DEFAULT_RULES)
    state = fns.init(jax.random.key(0))
    state, metrics = fns.train_step(state, batch, hyperparams)   # batch [accum, micro, T]
    sums = fns.eval_step(state["params"], eval_batch)            # eval_batch [B, T]

Parameters, optimizer state and batches are placed with NamedShardings from the
models' logical axis names and the rules (`bt_jax.mesh.logical_shardings`);
activations follow the models' logical constraints (`bt_jax.mesh.with_logical_rules`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bt_jax.mesh import logical_shardings, rows_spec, with_logical_rules
from bt_jax.models import sequence_loss
from bt_jax.optim import OptimizerConfig, make_optimizer, warmup_cosine_schedule

# Dense bf16 peak FLOP/s per device, for the MFU estimate (device_kind prefixes).
PEAK_FLOPS = (
  ("NVIDIA H200", 989e12),
  ("NVIDIA H100", 989e12),
  ("NVIDIA A100", 312e12),
  ("NVIDIA L4", 121e12),
  ("NVIDIA A10", 125e12),
  ("TPU v6", 918e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v4", 275e12),
  ("TPU v3", 123e12),
)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The jitted functions of one (model, mesh, rules) and the shardings they take."""

  init: Any  # rng -> state, placed on state_shardings
  train_step: Any  # (state, batch [accum, micro, T], hyperparams) -> (state, metrics)
  eval_step: Any  # (params, batch [B, T]) -> sums
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs with shardings
  train_batch_sharding: Any
  eval_batch_sharding: Any


def loss_sums(model: nn.Module, params, tokens, mask):
  """(sum of target NLLs, {"nll", "tokens", ["pos_nll", "pos_tokens"]}) over one batch."""
  _, aux = sequence_loss(model, params, tokens, mask)
  token_nll, weights = aux["token_nll"], aux["weights"]  # [batch, length]
  sums = {"nll": jnp.sum(token_nll), "tokens": jnp.sum(weights)}
  if model.config.tokens_per_step > 1:  # block models: loss by position inside a block
    step_len = model.config.tokens_per_step
    batch, length = tokens.shape
    # position t sits at t % step_len inside its block
    sums["pos_nll"] = jnp.sum(token_nll.reshape(batch, length // step_len, step_len), axis=(0, 1))
    sums["pos_tokens"] = jnp.sum(weights.reshape(batch, length // step_len, step_len), axis=(0, 1))
  return sums["nll"], sums


def train_step(model, param_shardings, state, batch, hyperparams):
  """One optimizer update from a batch {"tokens", "mask"} of [accum, micro, length].

  Micro-batch gradients of the summed NLL are accumulated and divided by the
  total number of target tokens: the same update as one big batch.
  """
  tx = make_optimizer(hyperparams)
  params = state["params"]
  grad_fn = jax.grad(functools.partial(loss_sums, model), has_aux=True)

  def accumulate(grads, micro_batch):
    micro_grads, sums = grad_fn(params, micro_batch["tokens"], micro_batch["mask"])
    return jax.tree.map(jnp.add, grads, micro_grads), sums

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  grads, sums = jax.lax.scan(accumulate, zeros, batch)
  sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
  num_tokens = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / num_tokens).astype(p.dtype), grads, params)
  grad_norm = jnp.sqrt(
    sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
  )
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {
    "step": state["step"] + 1,
    "params": optax.apply_updates(params, updates),
    "opt_state": opt_state,
  }
  metrics = dict(
    sums,
    loss=sums["nll"] / num_tokens,
    grad_norm=grad_norm,
    learning_rate=warmup_cosine_schedule(hyperparams)(state["step"]),
  )
  return new_state, metrics


def eval_step(model, params, batch):
  """The loss sums of one eval batch {"tokens", "mask"} of [batch, length]."""
  return loss_sums(model, params, batch["tokens"], batch["mask"])[1]


def init_state(model, rng):
  """{"step", "params" (boxed with logical axis names), "opt_state"} of a fresh run."""
  tokens = jnp.zeros((1, model.config.init_length), jnp.int32)
  params = model.init(rng, tokens)["params"]  # boxed with logical axis names
  # The optimizer state's structure does not depend on the hyperparameter values.
  tx = make_optimizer(OptimizerConfig().hyperparams(total_steps=1))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


@functools.lru_cache(maxsize=16)
def step_functions(model: nn.Module, mesh: jax.sharding.Mesh, rules: tuple) -> StepFunctions:
  """Jitted init / train / eval functions (cached: runs in one process share compiles)."""
  boxed = jax.eval_shape(functools.partial(init_state, model), jax.random.key(0))
  state_shardings = logical_shardings(boxed, mesh, rules)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.unbox(boxed),
    state_shardings,
  )
  rows = rows_spec(mesh, rules)  # the batch over the data-parallel axes
  P = jax.sharding.PartitionSpec
  train_batch = jax.sharding.NamedSharding(mesh, P(None, *rows, None))
  eval_batch = jax.sharding.NamedSharding(mesh, P(*rows, None))
  replicated = jax.sharding.NamedSharding(mesh, P())

  with_rules = functools.partial(with_logical_rules, mesh=mesh, rules=rules)
  init = jax.jit(lambda rng: nn.unbox(init_state(model, rng)), out_shardings=state_shardings)
  jitted_train_step = jax.jit(
    with_rules(functools.partial(train_step, model, state_shardings["params"])),
    in_shardings=(state_shardings, {"tokens": train_batch, "mask": train_batch}, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  jitted_eval_step = jax.jit(
    with_rules(functools.partial(eval_step, model)),
    in_shardings=(state_shardings["params"], {"tokens": eval_batch, "mask": eval_batch}),
    out_shardings=replicated,
  )
  return StepFunctions(
    init,
    jitted_train_step,
    jitted_eval_step,
    state_shardings,
    abstract_state,
    train_batch,
    eval_batch,
  )


def forward_flops(model, abstract_params, batch_size: int, seq_len: int) -> Optional[float]:
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
  """The device's dense bf16 peak FLOP/s from PEAK_FLOPS, or None (e.g. CPUs)."""
  kind = getattr(device, "device_kind", "")
  for prefix, flops in PEAK_FLOPS:
    if kind.startswith(prefix):
      return flops
  return None


def by_position(nll, tokens) -> Optional[list[float]]:
  """Mean loss at each position inside a block, from summed NLLs and token counts."""
  if nll is None:
    return None
  return [float(n / max(t, 1.0)) for n, t in zip(nll, tokens)]


def evaluate(fns: StepFunctions, params, eval_batches) -> dict[str, Any]:
  """eval_loss (mean NLL per target token), eval_perplexity and, for block
  models, eval_loss_by_position, over `eval_batches` placed by fns.eval_batch_sharding."""
  totals = None
  for batch in eval_batches:
    sums = fns.eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  loss = float(totals["nll"] / max(float(totals["tokens"]), 1.0))
  result = {"eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 700.0)))}
  losses = by_position(totals.get("pos_nll"), totals.get("pos_tokens"))
  if losses is not None:
    result["eval_loss_by_position"] = losses
  return result
