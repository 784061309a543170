"""The energy view of attention (Tree Attention paper, section 3).

For one query q of one head, keys k_a and values v_a (a = 1..N), the energy

    F(z) = log sum_a exp(sm_scale * q . k_a + z . v_a)

has F(0) = lse (the log-sum-exp of the scaled scores) and

    dF/dz (0) = sum_a softmax(sm_scale * q . k)_a v_a = attention output.

Because F is a log-sum-exp over the keys, splitting the keys into shards
gives F = logsumexp_i F_i with F_i the energy of shard i: the reduction is
associative and can be done as a tree. `sharded_energy` checks this.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def attention_energy(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  z: jax.Array,
  *,
  sm_scale: Optional[float] = None,
  mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Scalar energy F(z) of one query of one head.

  q [head_dim], k [kv_len, head_dim], v [kv_len, value_dim], z [value_dim]
  (shaped like one value vector), mask optional bool [kv_len] (True = key is
  visible). sm_scale defaults to head_dim ** -0.5, as in attention.
  jax.grad w.r.t. z at z = 0 is the attention output [value_dim]; the value at
  z = 0 is the lse. vmap over heads and batch for full tensors.
  """
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  scores = (k.astype(jnp.float32) @ q.astype(jnp.float32)) * sm_scale
  scores = scores + v.astype(jnp.float32) @ z.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  return jax.nn.logsumexp(scores)


def sharded_energy(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  z: jax.Array,
  num_shards: int,
  *,
  sm_scale: Optional[float] = None,
) -> jax.Array:
  """F(z) computed shard by shard and combined by logsumexp (tree-reducible)."""
  if k.shape[0] % num_shards:
    raise ValueError(f"kv_len={k.shape[0]} is not divisible by num_shards={num_shards}")
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  k_shards = k.reshape(num_shards, -1, k.shape[-1])
  v_shards = v.reshape(num_shards, -1, v.shape[-1])
  shard_energies = jax.vmap(lambda ks, vs: attention_energy(q, ks, vs, z, sm_scale=sm_scale))(
    k_shards, v_shards
  )
  return jax.nn.logsumexp(shard_energies)


def attention_from_energy(
  q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, sm_scale: Optional[float] = None
) -> Tuple[jax.Array, jax.Array]:
  """Decode attention computed as (grad F(0), F(0)), in the decode layout.

  q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim],
  lengths int [batch]. Returns out [batch, q_len, heads, head_dim] f32 and
  lse [batch, heads, q_len] f32. Rows must have at least one valid key (the
  gradient of an all -inf log-sum-exp is NaN).
  """
  heads = q.shape[2]
  group = heads // k.shape[2]
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  kv_head = jnp.arange(heads) // group
  mask = jnp.arange(k.shape[1])[None, :] < jnp.asarray(lengths)[:, None]

  def one(q_vec, k_mat, v_mat, row_mask):
    z = jnp.zeros(v_mat.shape[-1], jnp.float32)
    lse, out = jax.value_and_grad(attention_energy, argnums=3)(
      q_vec, k_mat, v_mat, z, sm_scale=sm_scale, mask=row_mask
    )
    return out, lse

  def one_head(q_tokens, k_all, v_all, row_mask, head):
    # q_tokens [q_len, head_dim], k_all/v_all [kv_len, kv_heads, head_dim]
    k_mat = k_all[:, kv_head[head]]
    v_mat = v_all[:, kv_head[head]]
    return jax.vmap(one, in_axes=(0, None, None, None))(q_tokens, k_mat, v_mat, row_mask)

  def one_row(q_row, k_row, v_row, row_mask):
    # over heads: q_row [q_len, heads, head_dim] -> out [heads, q_len, dim]
    return jax.vmap(one_head, in_axes=(1, None, None, None, 0))(
      q_row, k_row, v_row, row_mask, jnp.arange(heads)
    )

  out, lse = jax.vmap(one_row)(q, k, v, mask)  # [b, heads, q_len, d], [b, heads, q_len]
  return jnp.swapaxes(out, 1, 2), lse
