"""Single-device oracle for the sharded decode attentions, in plain jnp.

Deliberately independent of the attention the library runs: it shares no
code with `pallas_kernels` or with `pallas_kernels.reference.masked_attention`
(the models' "xla" path and the kernels' reference), and it is written
differently (GQA by repeating kv heads, one full softmax through
`jax.nn.logsumexp`), so that the tests of the sharded code never compare an
implementation with itself. Do not replace it with the shared reference.

`lengths` here is the exclusive end of each row's keys counted from slot 0,
i.e. the `ends` of a window that starts at 0.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def full_decode_attention_reference(
  q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, sm_scale: Optional[float] = None
) -> Tuple[jax.Array, jax.Array]:
  """Full softmax attention of q over the first lengths[b] keys of each row.

  q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim],
  lengths int [batch]. Returns out [batch, q_len, heads, head_dim] (f32) and
  lse [batch, heads, q_len] (f32); a row with no key gives 0 and -inf.
  """
  heads, head_dim = q.shape[2], q.shape[3]
  group = heads // k.shape[2]
  if sm_scale is None:
    sm_scale = head_dim**-0.5
  k_per_head = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  v_per_head = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  scores = jnp.einsum("bqhd,bthd->bhqt", q.astype(jnp.float32), k_per_head) * sm_scale
  positions = jnp.arange(k.shape[1])
  valid = positions[None, :] < jnp.asarray(lengths)[:, None]  # [batch, kv_len]
  scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)  # [batch, heads, q_len]
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("bhqt,bthd->bqhd", probs, v_per_head)
  return out, lse
