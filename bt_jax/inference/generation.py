"""Batched generation, compiled end to end: prefill, then `lax.while_loop` decoding.

    batch = prepare_prompts(prompts, model.config, max_new_tokens=32)
    out = generate(model, params, prompts, max_new_tokens=32,
                   sampling=SamplingConfig(temperature=0.8, top_p=0.95), eos_id=0, seed=1)
    text_ids = [out.tokens[b, :out.lengths[b]] for b in range(len(prompts))]

Prompts of different lengths share one batch: each is left-padded (block
models: first to a multiple of L_B with pad tokens the model sees, as in
training, then with whole masked pad blocks; see `caches`). A row that emits
`eos_id` is finished: its later tokens are `pad_id` and its length stops; the
loop ends when every row is finished or max_new_tokens are made. Sampling keys
are `fold_in(fold_in(key(seed), step), j)`, so a seed gives one result.

For streaming, `make_stream_fns` returns the same prefill and loop as two
compiled functions: the loop is run in chunks of steps.

Sharded generation: with `mesh` (a mesh with a `sequence` axis of p devices,
e.g. `bt_jax.distributed.make_sequence_mesh(p)`), the global KV cache (vanilla;
the Block Transformer's block decoder) is split over the p devices, new slots
dealt round robin so that the shards fill evenly, and attended by Tree
Attention; the tokens are those of unsharded generation. Parameters and
prompts are replicated on the mesh.

    out = generate(model, params, prompts, max_new_tokens=32, mesh=make_sequence_mesh(8))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bt_jax.config import ModelConfig
from bt_jax.inference.decoding import decoder_for
from bt_jax.inference.sampling import SamplingConfig, sample_logits
from bt_jax.mesh import check_params_fit, row_groups


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Left-padded prompts. tokens [batch, prompt_len] int32; pad [batch]: the
  masked left slots of each row; lengths [batch]: the prompt lengths given."""

  tokens: np.ndarray
  pad: np.ndarray
  lengths: np.ndarray


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """tokens [batch, max_new_tokens] (pad_id after a row's end); lengths
  [batch]: generated tokens per row, EOS included; logits [batch,
  max_new_tokens, vocab] f32 when asked for."""

  tokens: jax.Array
  lengths: jax.Array
  logits: Optional[jax.Array] = None


def num_steps_for(config: ModelConfig, max_new_tokens: int) -> int:
  return config.num_steps(max_new_tokens)


def pad_rows(prompts: Sequence[Sequence[int]], groups: int) -> Sequence[Sequence[int]]:
  """`prompts` padded with copies of the first to a multiple of `groups`
  (rows split evenly over a mesh axis; the caller drops the copies' output)."""
  if not prompts or len(prompts) % groups == 0:
    return prompts
  return list(prompts) + [prompts[0]] * (groups - len(prompts) % groups)


def left_pad(
  prompts: Sequence[Sequence[int]], config: ModelConfig
) -> tuple[np.ndarray, np.ndarray]:
  """The left padding of prompts (generation and experiments.throughput):
  (tokens [batch, prompt_len] int32, pad [batch] int32). A block model's row is
  first padded with pad_id to a block boundary; those pads are part of the row
  (as the random left pad of training), not masked. Rows are then left-padded
  to the longest, and `pad` counts those masked slots."""
  rows = [
    [config.pad_id] * (config.aligned_length(len(ids)) - len(ids)) + list(ids) for ids in prompts
  ]
  prompt_len = max(len(r) for r in rows)
  tokens = np.full((len(rows), prompt_len), config.pad_id, np.int32)
  pad = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    tokens[i, prompt_len - len(row) :] = row
    pad[i] = prompt_len - len(row)
  return tokens, pad


def prepare_prompts(
  prompts: Sequence[Sequence[int]], config: ModelConfig, max_new_tokens: int
) -> PromptBatch:
  """Left-pads token-id prompts into one batch, checking them against the model."""
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if len(prompts) == 0:
    raise ValueError("no prompts given; pass a list of token-id lists")
  block_len = config.tokens_per_step
  checked = []
  for i, prompt in enumerate(prompts):
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError(
        f"prompt {i} is empty; give at least one token (e.g. the EOS id "
        f"{config.pad_id} to generate from nothing)"
      )
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
      raise ValueError(
        f"prompt {i} has token id {bad[0]} outside the vocabulary; valid ids "
        f"are 0..{config.vocab_size - 1}"
      )
    checked.append(ids)
  tokens, pad = left_pad(checked, config)
  prompt_len = tokens.shape[1]
  new_len = num_steps_for(config, max_new_tokens) * block_len
  if new_len >= config.max_len:
    raise ValueError(
      f"max_new_tokens {max_new_tokens}"
      + (f" (rounded up to whole blocks: {new_len})" if block_len > 1 else "")
      + f" leaves no room for a prompt in the model's context max_len {config.max_len}; "
      f"at most {config.max_len - block_len} new tokens fit after a "
      f"{'one-block' if block_len > 1 else 'one-token'} prompt"
    )
  if prompt_len + new_len > config.max_len:
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    detail = (
      f" (padded to a multiple of block_len {block_len}: {prompt_len})" if block_len > 1 else ""
    )
    raise ValueError(
      f"prompt {longest} has {len(prompts[longest])} tokens{detail}; with max_new_tokens "
      f"{max_new_tokens}"
      + (f" (rounded up to whole blocks: {new_len})" if block_len > 1 else "")
      + f" that exceeds the model's context max_len {config.max_len}; at most "
      f"{config.max_len - new_len} prompt tokens fit, or lower max_new_tokens"
    )
  return PromptBatch(tokens, pad, np.array([len(p) for p in prompts], np.int32))


# ---- The compiled loop. ----


def _init_state(
  model: nn.Module,
  params,
  tokens,
  pad,
  rng,
  eos_id=-1,
  *,
  max_new_tokens: int,
  keep_logits: bool,
  mesh: Optional[Mesh] = None,
):
  decoder = decoder_for(model, mesh)
  config = model.config
  num_steps = num_steps_for(config, max_new_tokens)
  tokens, pad = decoder.align_prompt(tokens, pad, num_steps)
  tokens, pad = decoder.constrain_rows((tokens, pad))  # split by rows on a data axis
  batch = tokens.shape[0]
  out_len = num_steps * decoder.tokens_per_step
  rows = {
    "pad": pad,
    "done": jnp.zeros((batch,), bool),
    "lengths": jnp.zeros((batch,), jnp.int32),
    "tokens": jnp.full((batch, out_len), config.pad_id, jnp.int32),
  }
  if keep_logits:
    rows["logits"] = jnp.zeros((batch, out_len, config.vocab_size), jnp.float32)
  state = {
    "carry": decoder.prefill(params, tokens, pad, num_steps),
    "step": jnp.int32(0),
    "rng": rng,
    "eos_id": jnp.asarray(eos_id, jnp.int32),  # -1: no EOS
    **decoder.constrain_rows(rows),
  }
  return state


def _advance(
  model: nn.Module,
  params,
  state,
  *,
  sampling: SamplingConfig,
  read_slots: int,
  mesh: Optional[Mesh] = None,
):
  """One decoder step (1 token, or one block), with per-row EOS handling."""
  decoder = decoder_for(model, mesh)
  step = state["step"]
  step_key = jax.random.fold_in(state["rng"], step)

  def sample(logits, j):
    return sample_logits(logits, jax.random.fold_in(step_key, j), sampling)

  keep_logits = "logits" in state
  tokens, logits, carry = decoder.step(
    params, state["carry"], step, state["pad"], sample, keep_logits, read_slots
  )
  done = state["done"]
  dead = jnp.broadcast_to(done[:, None], tokens.shape)
  is_eos = tokens == state["eos_id"]
  after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
  dead = dead | after_eos
  done = done | jnp.any(is_eos, axis=1)
  tokens = jnp.where(dead, model.config.pad_id, tokens)
  start = step * decoder.tokens_per_step
  new_state = dict(
    state,
    carry=carry,
    step=step + 1,
    done=done,
    lengths=state["lengths"] + jnp.sum(~dead, axis=1).astype(jnp.int32),
    tokens=jax.lax.dynamic_update_slice_in_dim(state["tokens"], tokens, start, axis=1),
  )
  if keep_logits:
    new_state["logits"] = jax.lax.dynamic_update_slice_in_dim(
      state["logits"], logits, start, axis=1
    )
  return new_state


def _run(
  model: nn.Module,
  params,
  state,
  stop_step,
  *,
  sampling,
  segments: int = 1,
  mesh: Optional[Mesh] = None,
):
  """Steps until `stop_step` or until every row is finished.

  With segments > 1 the steps are split into that many consecutive loops; the
  attention of a loop reads only the global-cache slots filled by its last
  step (the prompt and the steps so far), not the whole preallocated cache.
  """
  decoder = decoder_for(model, mesh)
  num_steps = state["tokens"].shape[1] // decoder.tokens_per_step
  cache_len = decoder.cache_len(state["carry"])
  segments = max(1, min(segments, num_steps))
  for k in range(segments):
    end = -(-num_steps * (k + 1) // segments)

    def cond(state, end=end):
      return (state["step"] < jnp.minimum(stop_step, end)) & ~jnp.all(state["done"])

    body = functools.partial(
      _advance, model, params, sampling=sampling, read_slots=cache_len - num_steps + end, mesh=mesh
    )
    state = jax.lax.while_loop(cond, body, state)
  return state


def _finish(model: nn.Module, state, max_new_tokens: int) -> GenerateOutput:
  logits = state.get("logits")
  return GenerateOutput(
    tokens=state["tokens"][:, :max_new_tokens],
    lengths=jnp.minimum(state["lengths"], max_new_tokens),
    logits=None if logits is None else logits[:, :max_new_tokens],
  )


def _generate(
  model,
  max_new_tokens,
  sampling,
  return_logits,
  segments,
  mesh,
  params,
  tokens,
  pad,
  rng,
  eos_id=-1,
):
  state = _init_state(
    model,
    params,
    tokens,
    pad,
    rng,
    eos_id,
    max_new_tokens=max_new_tokens,
    keep_logits=return_logits,
    mesh=mesh,
  )
  state = _run(
    model,
    params,
    state,
    num_steps_for(model.config, max_new_tokens),
    sampling=sampling,
    segments=segments,
    mesh=mesh,
  )
  return _finish(model, state, max_new_tokens)


jax.tree_util.register_dataclass(
  GenerateOutput, data_fields=["tokens", "lengths", "logits"], meta_fields=[]
)


def _on_mesh(fn, mesh: Optional[Mesh], num_replicated: int):
  """fn with its first `num_replicated` arguments replicated on `mesh` first.

  A jitted computation that spans the mesh cannot take arrays committed to
  one device (params from a jitted init are), so they are placed on it."""
  if mesh is None:
    return fn
  replicated = NamedSharding(mesh, P())

  @functools.wraps(fn)
  def placed(*args, **kwargs):
    args = tuple(jax.device_put(args[:num_replicated], replicated)) + args[num_replicated:]
    return fn(*args, **kwargs)

  placed.jitted = fn  # for .lower(...)
  return placed


def _check_mesh(model: nn.Module, mesh: Optional[Mesh]) -> None:
  """A bad mesh is an error at the call, not at the first trace."""
  check_params_fit(model, mesh)  # a (data, fsdp, tensor) mesh must divide the parameters
  decoder_for(model, mesh)


@functools.lru_cache(maxsize=64)
def generate_fn(
  model: nn.Module,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  return_logits: bool = False,
  segments: int = 1,
  mesh: Optional[Mesh] = None,
):
  """The jitted generate: f(params, tokens [batch, prompt_len], pad [batch], rng,
  eos_id=-1) -> GenerateOutput.

  tokens / pad as made by `prepare_prompts`; eos_id is traced (-1: none), so
  one compile per model, settings and shape serves every EOS. Cached.
  segments > 1 runs the decode loop in that many pieces, each reading only the
  filled part of the caches (less memory traffic, `segments` copies of the
  step to compile; see `_run`). mesh: shard the global KV cache over its
  `sequence` axis (see the module docstring); the arguments are placed on the
  mesh, replicated.
  """
  _check_mesh(model, mesh)
  fn = jax.jit(
    functools.partial(_generate, model, max_new_tokens, sampling, return_logits, segments, mesh)
  )
  return _on_mesh(fn, mesh, num_replicated=5)


def generate(
  model: nn.Module,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  eos_id: Optional[int] = None,
  seed: int = 0,
  return_logits: bool = False,
  segments: int = 1,
  mesh: Optional[Mesh] = None,
) -> GenerateOutput:
  """Generates up to max_new_tokens after each prompt (lists of token ids).

  mesh: a mesh with a `sequence` axis to shard the global KV cache over
  (sharded generation, same tokens); with a `data` axis too, the rows are
  split over it (the batch is padded with copies of the first prompt up to a
  multiple of its size, and those rows dropped from the output). None keeps
  everything on one device.
  """
  num_prompts = len(prompts)
  prompts = pad_rows(prompts, row_groups(mesh))
  batch = prepare_prompts(prompts, model.config, max_new_tokens)
  fn = generate_fn(model, max_new_tokens, sampling, return_logits, segments, mesh)
  out = fn(
    params,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.pad),
    jax.random.key(seed),
    -1 if eos_id is None else eos_id,
  )
  if len(prompts) == num_prompts:
    return out
  return jax.tree.map(lambda x: x[:num_prompts], out)


@functools.lru_cache(maxsize=16)
def make_stream_fns(
  model: nn.Module,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  segments: int = 1,
  mesh: Optional[Mesh] = None,
):
  """(start, resume, finish) for streaming: the loop of `generate` in chunks.

  start(params, tokens, pad, rng, eos_id=-1) -> state   (compiled prefill)
  resume(params, state, stop_step) -> state     (compiled loop up to stop_step)
  finish(state) -> GenerateOutput
  state["step"] counts steps done, each of `tokens_per_step(model)` tokens;
  state["tokens"] / state["lengths"] hold what is made so far. With a mesh,
  state["carry"]["cache"] is the sharded global cache (round-robin slots, see
  `bt_jax.distributed.sharded_cache`).
  """
  _check_mesh(model, mesh)
  start = jax.jit(
    functools.partial(
      _init_state, model, max_new_tokens=max_new_tokens, keep_logits=False, mesh=mesh
    )
  )
  resume = jax.jit(
    functools.partial(_run, model, sampling=sampling, segments=segments, mesh=mesh),
    donate_argnums=(1,),
  )
  start = _on_mesh(start, mesh, num_replicated=5)
  resume = _on_mesh(resume, mesh, num_replicated=1)
  return start, resume, functools.partial(_finish, model, max_new_tokens=max_new_tokens)


def tokens_per_step(model: nn.Module) -> int:
  return decoder_for(model).tokens_per_step
