"""GPT-NeoX building blocks in flax.linen.

One decoder layer (parallel residual, LayerNorm eps 1e-5, biases everywhere,
erf GELU, rotary on the first 25% of each head's dims in the NeoX
"rotate half" layout, MLP 4*D) and a stack of them with a final LayerNorm.
Every parameter carries logical axis names from `bt_jax.axes`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bt_jax import axes
from bt_jax.attention import dot_product_attention
from bt_jax.config import StackConfig

Dtype = Any


def normal_init(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def zeros_init(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
      bias_init=zeros_init((axes.NORM,)))


def rotary_tables(positions: jax.Array, rotary_dims: int, base: float):
  """cos/sin tables [..., length, rotary_dims] for integer positions [..., length]."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., length, rot/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)              # NeoX layout
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, positions: jax.Array, rotary_dims: int, base: float) -> jax.Array:
  """Rotates the first `rotary_dims` channels of x [batch, length, heads, head_dim]."""
  if rotary_dims == 0:
    return x
  cos, sin = rotary_tables(positions, rotary_dims, base)
  if cos.ndim == 2:           # positions [length]: shared by every row
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]           # [batch, length, 1, rot]
  x_rot, x_pass = x[..., :rotary_dims].astype(jnp.float32), x[..., rotary_dims:]
  half = rotary_dims // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  x_rot = x_rot * cos + rotated * sin
  return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)


class Attention(nn.Module):
  """Multi-head attention with rotary embeddings (self) or without (cross)."""

  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  attention_impl: str = "xla"
  causal: bool = True
  use_rotary: bool = True

  def _proj(self, name: str) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features=(self.stack.num_heads, self.stack.resolved_head_dim), axis=-1,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=normal_init(self.init_std, (axes.EMBED, axes.HEADS, axes.KV)),
        bias_init=zeros_init((axes.HEADS, axes.KV)))

  @nn.compact
  def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None,
               memory: Optional[jax.Array] = None, mask: Optional[jax.Array] = None):
    """x [batch, length, embed]; memory [batch, mem_len, embed] for cross attention."""
    kv_input = x if memory is None else memory
    query = self._proj("query")(x)        # [batch, length, heads, head_dim]
    key = self._proj("key")(kv_input)
    value = self._proj("value")(kv_input)
    if self.use_rotary:
      query = apply_rotary(query, positions, self.stack.rotary_dims, self.stack.rotary_base)
      key = apply_rotary(key, positions, self.stack.rotary_dims, self.stack.rotary_base)
    query = nn.with_logical_constraint(query, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.KV))
    out = dot_product_attention(query, key, value, causal=self.causal and memory is None,
                                impl=self.attention_impl, mask=mask)
    return nn.DenseGeneral(
        features=self.stack.width, axis=(-2, -1), dtype=self.dtype,
        param_dtype=self.param_dtype, name="out",
        kernel_init=normal_init(self.init_std, (axes.HEADS, axes.KV, axes.EMBED)),
        bias_init=zeros_init((axes.EMBED,)))(out)


class Mlp(nn.Module):
  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.stack.mlp_ratio * self.stack.width
    h = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="wi",
                 kernel_init=normal_init(self.init_std, (axes.EMBED, axes.MLP)),
                 bias_init=zeros_init((axes.MLP,)))(x)
    h = nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return nn.Dense(self.stack.width, dtype=self.dtype, param_dtype=self.param_dtype, name="wo",
                    kernel_init=normal_init(self.init_std, (axes.MLP, axes.EMBED)),
                    bias_init=zeros_init((axes.EMBED,)))(h)


class DecoderLayer(nn.Module):
  """x + attn(LN1(x)) + mlp(LN2(x)) [+ cross_attn(LN3(x), memory)]."""

  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  attention_impl: str = "xla"
  causal: bool = True
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x, positions, memory=None, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.stack.layer_norm_eps
    attn = Attention(self.stack, init_std=self.init_std, attention_impl=self.attention_impl,
                     causal=self.causal, name="attention", **kw)
    mlp = Mlp(self.stack, init_std=self.init_std, name="mlp", **kw)
    out = x + attn(layer_norm(eps, name="ln_attention", **kw)(x), positions, mask=mask)
    out = out + mlp(layer_norm(eps, name="ln_mlp", **kw)(x))
    if self.cross_attention:
      cross = Attention(self.stack, init_std=self.init_std, attention_impl=self.attention_impl,
                        causal=False, use_rotary=False, name="cross_attention", **kw)
      out = out + cross(layer_norm(eps, name="ln_cross", **kw)(x), memory=memory)
    return nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


class DecoderStack(nn.Module):
  """num_layers decoder layers and a final LayerNorm."""

  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  attention_impl: str = "xla"
  causal: bool = True
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, memory=None, mask=None) -> jax.Array:
    x = x.astype(self.dtype)
    for i in range(self.stack.num_layers):
      x = DecoderLayer(self.stack, dtype=self.dtype, param_dtype=self.param_dtype,
                       init_std=self.init_std, attention_impl=self.attention_impl,
                       causal=self.causal, cross_attention=self.cross_attention,
                       name=f"layer_{i}")(x, positions, memory, mask)
    return layer_norm(self.stack.layer_norm_eps, self.dtype, self.param_dtype, "final_ln")(x)
