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
from bt_jax.attention import attend
from bt_jax.config import StackConfig

Dtype = Any


def normal_init(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def zeros_init(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
    bias_init=zeros_init((axes.NORM,)),
  )


def rotary_tables(positions: jax.Array, rotary_dims: int, base: float):
  """cos/sin tables [..., length, rotary_dims] for integer positions [..., length]."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., length, rot/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # NeoX layout
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, positions: jax.Array, rotary_dims: int, base: float) -> jax.Array:
  """Rotates the first `rotary_dims` channels of x [batch, length, heads, head_dim]."""
  if rotary_dims == 0:
    return x
  cos, sin = rotary_tables(positions, rotary_dims, base)
  if cos.ndim == 2:  # positions [length]: shared by every row
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [batch, length, 1, rot]
  x_rot, x_pass = x[..., :rotary_dims].astype(jnp.float32), x[..., rotary_dims:]
  half = rotary_dims // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  x_rot = x_rot * cos + rotated * sin
  return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)


class Projection(nn.Module):
  """A dense map between multi-axis features: y = einsum(x, kernel) + bias.

  Like `nn.DenseGeneral`, but the kernel is created with its full shape
  (`in_shape + features`), so its logical axis names describe it at every
  point: DenseGeneral initialises a flattened 2-D kernel, which clashes with
  3 logical names once `nn.logical_axis_rules` is active. Parameters are
  called "kernel" and "bias" with DenseGeneral's shapes, so checkpoints agree.
  """

  features: tuple[int, ...]
  in_axes: int  # how many trailing axes of x are contracted
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_axes :]
    kernel = self.param(
      "kernel",
      normal_init(self.init_std, self.kernel_axes),
      tuple(in_shape) + tuple(self.features),
      self.param_dtype,
    )
    bias = self.param("bias", zeros_init(self.bias_axes), tuple(self.features), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = tuple(range(x.ndim - self.in_axes, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.in_axes))), ((), ())))
    return y + bias


class Embed(nn.Embed):
  """nn.Embed whose lookup keeps the table split over its vocabulary.

  The table is (VOCAB, EMBED): vocab over the tensor axis, embed over fsdp.
  Before the lookup it is gathered over fsdp only (FSDP's weight all-gather)
  and stays split by vocabulary, so XLA partitions the lookup Megatron-style:
  each tensor shard takes the rows it holds (zeros elsewhere) and the shards
  are summed. Without this, the table split both ways and the ids split over
  (data, fsdp) share the fsdp axis, and XLA falls back to "involuntary full
  rematerialization" of the gathered activations. Same parameters and
  results as nn.Embed (a no-op outside a mesh).
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"embedding ids must be integers; got {inputs.dtype}")
    (table,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    table = nn.with_logical_constraint(table, (axes.VOCAB, None))
    return jnp.take(table, inputs, axis=0)


class Attention(nn.Module):
  """Multi-head attention with rotary embeddings (self) or without (cross)."""

  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  attention_impl: str = "xla"
  causal: bool = True
  use_rotary: bool = True

  def _proj(self, name: str) -> Projection:
    return Projection(
      features=(self.stack.num_heads, self.stack.resolved_head_dim),
      in_axes=1,
      kernel_axes=(axes.EMBED, axes.HEADS, axes.KV),
      bias_axes=(axes.HEADS, axes.KV),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      init_std=self.init_std,
      name=name,
    )

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: Optional[jax.Array] = None,
    memory: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
    cache: Optional[dict] = None,
    cache_index=None,
    local_block: Optional[int] = None,
    window=None,
    sharding=None,
  ):
    """x [batch, length, embed]; memory [batch, mem_len, embed] for cross attention.

    Projections and rotary, then `bt_jax.attention.attend`, which owns every
    path and kernel choice (see its table). With `cache` ({"key", "value"}:
    [batch, cache_len, heads, head_dim]) the new keys/values are written at
    slots cache_index .. (cache_index a scalar, or int32 [batch]), the
    queries attend over the first read_len slots under `mask` [batch|1,
    length, read_len] (it must encode causality and padding), and
    (out, new_cache) is returned. `window` (starts, ends) int32 [batch]: the
    run of cache slots each row sees, when the caller knows it (the
    decoders do); it lets "pallas" run the decode kernel. `sharding` (a
    `bt_jax.distributed.ShardedKVCache`): the cache is sharded over its mesh
    axis and attended by Tree Attention. `local_block` S: attention stays
    inside consecutive runs of S positions (no cache).
    """
    kv_input = x if memory is None else memory
    query = self._proj("query")(x)  # [batch, length, heads, head_dim]
    key = self._proj("key")(kv_input)
    value = self._proj("value")(kv_input)
    if self.use_rotary:
      query = apply_rotary(query, positions, self.stack.rotary_dims, self.stack.rotary_base)
      key = apply_rotary(key, positions, self.stack.rotary_dims, self.stack.rotary_base)
    query = nn.with_logical_constraint(query, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.KV))
    out, new_cache = attend(
      query,
      key,
      value,
      mask=mask,
      causal=self.causal and memory is None,
      local_block=local_block,
      cache=cache,
      cache_index=cache_index,
      window=window,
      impl=self.attention_impl,
      sharding=sharding,
    )
    out = Projection(
      features=(self.stack.width,),
      in_axes=2,
      kernel_axes=(axes.HEADS, axes.KV, axes.EMBED),
      bias_axes=(axes.EMBED,),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      init_std=self.init_std,
      name="out",
    )(out)
    return out if cache is None else (out, new_cache)


class Mlp(nn.Module):
  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.stack.mlp_ratio * self.stack.width
    h = nn.Dense(
      hidden,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="wi",
      kernel_init=normal_init(self.init_std, (axes.EMBED, axes.MLP)),
      bias_init=zeros_init((axes.MLP,)),
    )(x)
    h = nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return nn.Dense(
      self.stack.width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="wo",
      kernel_init=normal_init(self.init_std, (axes.MLP, axes.EMBED)),
      bias_init=zeros_init((axes.EMBED,)),
    )(h)


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
  def __call__(
    self,
    x,
    positions,
    memory=None,
    mask=None,
    cache=None,
    cache_index=None,
    local_block=None,
    window=None,
    sharding=None,
  ):
    """Returns the new x, or (x, new_cache) when a self-attention `cache` is given.
    window, sharding: for the cached self-attention (see `Attention`)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.stack.layer_norm_eps
    attn = Attention(
      self.stack,
      init_std=self.init_std,
      attention_impl=self.attention_impl,
      causal=self.causal,
      name="attention",
      **kw,
    )
    mlp = Mlp(self.stack, init_std=self.init_std, name="mlp", **kw)
    attended = attn(
      layer_norm(eps, name="ln_attention", **kw)(x),
      positions,
      mask=mask,
      cache=cache,
      cache_index=cache_index,
      local_block=local_block,
      window=window,
      sharding=sharding,
    )
    if cache is not None:
      attended, cache = attended
    out = x + attended
    out = out + mlp(layer_norm(eps, name="ln_mlp", **kw)(x))
    if self.cross_attention:
      cross = Attention(
        self.stack,
        init_std=self.init_std,
        attention_impl=self.attention_impl,
        causal=False,
        use_rotary=False,
        name="cross_attention",
        **kw,
      )
      out = out + cross(layer_norm(eps, name="ln_cross", **kw)(x), memory=memory)
    out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    return out if cache is None else (out, cache)


class DecoderStack(nn.Module):
  """num_layers decoder layers and a final LayerNorm."""

  stack: StackConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  attention_impl: str = "xla"
  causal: bool = True
  cross_attention: bool = False
  remat: str = "none"  # config.REMAT_POLICIES; applies without caches only

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    memory=None,
    mask=None,
    caches=None,
    cache_index=None,
    local_block: Optional[int] = None,
    window=None,
    sharding=None,
  ):
    """Returns hidden states, or (hidden, new_caches) when `caches` (one
    {"key", "value"} dict per layer, see `Attention`) is given; window and
    sharding go to every layer's cached self-attention."""
    x = x.astype(self.dtype)
    new_caches = []
    layer_cls = DecoderLayer
    if caches is None and self.remat != "none":
      # Argument 7 (self is 0) is local_block, a Python int the layer branches on.
      policy = (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        if self.remat == "minimal"
        else None
      )
      layer_cls = nn.remat(DecoderLayer, policy=policy, static_argnums=(7,))
    for i in range(self.stack.num_layers):
      layer = layer_cls(
        self.stack,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        init_std=self.init_std,
        attention_impl=self.attention_impl,
        causal=self.causal,
        cross_attention=self.cross_attention,
        name=f"layer_{i}",
      )
      if caches is None:
        x = layer(x, positions, memory, mask, None, None, local_block)
      else:
        x, cache = layer(
          x,
          positions,
          memory,
          mask,
          cache=caches[i],
          cache_index=cache_index,
          window=window,
          sharding=sharding,
        )
        new_caches.append(cache)
    x = layer_norm(self.stack.layer_norm_eps, self.dtype, self.param_dtype, "final_ln")(x)
    return x if caches is None else (x, new_caches)
