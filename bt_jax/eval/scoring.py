"""Log-likelihood of continuations, batched in a few fixed shapes.

The tokenisation follows lm-evaluation-harness 0.4.x (`TemplateLM`):
- context + continuation are encoded together and split at the token count of
  the context alone; trailing whitespace of the context moves to the
  continuation first;
- an empty context becomes a single end-of-text token (or, when the
  continuation already starts with it, that first token);
- inputs longer than the model's context lose tokens on the left.

One difference from the harness's HF model under truncation: the harness feeds
max_len tokens and reads the prediction after the last one, so it conditions on
one token more than `token_logprobs` can (the scored token must sit inside the
max_len window). Only inputs longer than the context are affected.

Scores come from `bt_jax.models.token_logprobs`, so vanilla and block models
(the block models' evaluation alignment, `bt_jax.models.token_logprobs`) go through the same path. Requests are padded to a
few bucket lengths (powers of two up to the context) and a fixed number of rows,
so only a handful of shapes compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Protocol, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bt_jax.config import BlockConfig
from bt_jax.eval.sharding import EvalSharding, eval_sharding
from bt_jax.models import block_aligned, token_logprobs


class TokenizerLike(Protocol):
  eos_id: int

  def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  """Token ids of a context and of the continuation whose log-prob is wanted."""

  context_ids: tuple[int, ...]
  continuation_ids: tuple[int, ...]


def encode_pair(tokenizer: TokenizerLike, context: str, continuation: str) -> ScoreRequest:
  """The harness's (context, continuation) -> token ids for a causal LM."""
  if context == "":
    continuation_ids = list(tokenizer.encode(continuation))
    eot = tokenizer.eos_id
    if continuation_ids and continuation_ids[0] == eot:
      return ScoreRequest(tuple(continuation_ids[:1]), tuple(continuation_ids[1:]))
    return ScoreRequest((eot,), tuple(continuation_ids))
  num_spaces = len(context) - len(context.rstrip())
  if num_spaces:
    continuation = context[-num_spaces:] + continuation
    context = context[:-num_spaces]
  whole_ids = list(tokenizer.encode(context + continuation))
  context_len = len(tokenizer.encode(context))
  return ScoreRequest(tuple(whole_ids[:context_len]), tuple(whole_ids[context_len:]))


def make_window(
  request: ScoreRequest, max_len: int, first_scored: int = 1
) -> tuple[list[int], int]:
  """The last max_len tokens of context + continuation, and where the
  continuation starts in them. `first_scored`: the first position the model
  can score (1; block_len for a block model scored with `eval_no_pad`)."""
  num_cont = len(request.continuation_ids)
  if num_cont > max_len - first_scored:
    raise ValueError(
      f"continuation of {num_cont} tokens does not fit the model context of {max_len} tokens "
      f"(at most {max_len - first_scored}: {first_scored} token(s) must precede it)"
    )
  tokens = list(request.context_ids + request.continuation_ids)[-max_len:]
  start = len(tokens) - num_cont
  if start < first_scored:
    raise ValueError(
      f"the continuation starts at token {start}, but this model scores tokens from position "
      f"{first_scored} on (a block model with eval_no_pad never scores block 0): the context "
      f"needs at least {first_scored} tokens, it has {start}"
    )
  return tokens, start


def bucket_lengths(max_len: int, min_bucket: int = 32) -> tuple[int, ...]:
  """Powers of two from min_bucket, capped by (and always including) max_len."""
  if min_bucket <= 0:
    raise ValueError(f"min_bucket must be positive, got {min_bucket}")
  buckets = []
  size = min_bucket
  while size < max_len:
    buckets.append(size)
    size *= 2
  buckets.append(max_len)
  return tuple(buckets)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def greedy_hits(model: nn.Module, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """[batch, length] bool: is tokens[b, t] the argmax of p(. | tokens[b, :t])?

  Same alignment as `token_logprobs` (block models: L-1 left pads); position 0
  is False. The harness's `is_greedy` needs the argmax, which log-probs of the
  scored tokens alone cannot give.
  """
  config = model.config
  batch, length = tokens.shape
  if isinstance(config, BlockConfig):
    block_len = config.block_len
    aligned, _ = block_aligned(
      tokens, mask, block_len, config.pad_id, left_pad=not config.eval_no_pad
    )
    logits = model.apply({"params": params}, aligned)  # [batch, blocks-1, block_len, vocab]
    predicted = jnp.argmax(logits, axis=-1).reshape(batch, -1)
    hits = predicted == aligned[:, block_len:]
    hits = jnp.concatenate([jnp.zeros((batch, block_len), bool), hits], axis=1)
    start = 0 if config.eval_no_pad else block_len - 1
    return hits[:, start : start + length]
  logits = model.apply({"params": params}, tokens)  # [batch, length, vocab]
  hits = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), hits], axis=1)


def _score_batch(model, with_greedy, params, tokens, mask, target):
  """Sums of log-probs over `target` positions [batch]; greedy flags [batch]."""
  logprobs, valid = token_logprobs(model, params, tokens, mask)
  target = target & valid
  sums = jnp.sum(jnp.where(target, logprobs, 0.0), axis=1)
  if not with_greedy:
    return sums, jnp.zeros(sums.shape, bool)
  hits = greedy_hits(model, params, tokens, mask)
  return sums, jnp.all(hits | ~target, axis=1)


@functools.lru_cache(maxsize=16)
def _jitted_score_batch(
  model: nn.Module, with_greedy: bool, sharding: Optional[EvalSharding] = None
):
  """One jitted function per (model, with_greedy, sharding), shared by all
  scorers, so a second scorer of the same model (the lm-eval adapter, say)
  compiles nothing new."""
  fn = functools.partial(_score_batch, model, with_greedy)
  if sharding is None:
    return jax.jit(fn)
  return sharding.jit(fn, model, num_batch_args=3)


class LoglikelihoodScorer:
  """Scores many `ScoreRequest`s with one jitted function and few shapes.

  Rows per batch: `batch_size`, reduced for long buckets so that
  rows * bucket_length <= max_batch_tokens (when given). Every batch of a
  bucket has the same shape; missing rows are dummies. With `mesh` (a (data,
  fsdp, tensor) mesh, `bt_jax.mesh.make_mesh`) or `sharding`
  (`bt_jax.eval.sharding.EvalSharding`) the params are placed on the mesh by
  the training rules and each batch is split over its data-parallel axes
  (rows rounded up to a multiple of them).
  """

  def __init__(
    self,
    model: nn.Module,
    params: Any,
    *,
    batch_size: int = 32,
    max_batch_tokens: Optional[int] = None,
    min_bucket: int = 32,
    with_greedy: bool = False,
    sharding: Optional[EvalSharding] = None,
    mesh: Optional[Mesh] = None,
  ):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    sharding = eval_sharding(mesh, sharding)
    self.model = model
    self.sharding = sharding
    self.params = params if sharding is None else sharding.place_params(model, params)
    self.max_len = model.config.max_len
    self.batch_size = batch_size
    self.max_batch_tokens = max_batch_tokens
    self.buckets = bucket_lengths(self.max_len, min_bucket)
    self.with_greedy = with_greedy
    self._score = _jitted_score_batch(model, with_greedy, sharding)

  def rows_for(self, bucket: int) -> int:
    if self.max_batch_tokens is None:
      rows = self.batch_size
    else:
      rows = max(1, min(self.batch_size, self.max_batch_tokens // bucket))
    return rows if self.sharding is None else self.sharding.rows(rows)

  def __call__(
    self, requests: Sequence[ScoreRequest], *, progress: bool = True, desc: str = "scoring"
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (loglikelihoods float64 [n], is_greedy bool [n]) in request order."""
    vocab_size = self.model.config.vocab_size
    windows = []
    for request in requests:
      tokens, start = make_window(request, self.max_len, self.model.config.first_eval_position)
      bad = [t for t in tokens if not 0 <= t < vocab_size]
      if bad:
        raise ValueError(
          f"token id {bad[0]} is outside the model vocabulary (valid "
          f"0..{vocab_size - 1}); does the tokenizer match the model?"
        )
      windows.append((tokens, start))

    by_bucket: dict[int, list[int]] = {}
    for index, (tokens, _) in enumerate(windows):
      by_bucket.setdefault(bucket_for(len(tokens), self.buckets), []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
      indices = sorted(by_bucket[bucket], key=lambda i: -len(windows[i][0]))
      rows = self.rows_for(bucket)
      batches += [(bucket, rows, indices[i : i + rows]) for i in range(0, len(indices), rows)]

    loglikelihoods = np.zeros(len(requests), np.float64)
    greedy = np.zeros(len(requests), bool)
    pending = None  # the previous batch's results, read after the next is dispatched

    def collect(indices, sums, hits):
      sums, hits = np.asarray(sums), np.asarray(hits)
      for row, index in enumerate(indices):
        loglikelihoods[index] = sums[row]
        greedy[index] = hits[row]

    for bucket, rows, indices in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
      tokens = np.zeros((rows, bucket), np.int32)
      mask = np.zeros((rows, bucket), np.int32)
      target = np.zeros((rows, bucket), bool)
      mask[:, 0] = 1  # dummy rows: one real token, nothing scored
      for row, index in enumerate(indices):
        window, start = windows[index]
        tokens[row, : len(window)] = window
        mask[row, : len(window)] = 1
        target[row, start : len(window)] = True
      result = (indices, *self._score(self.params, tokens, mask, target))
      if pending is not None:
        collect(*pending)  # the host builds the next batch while the device computes
      pending = result
    if pending is not None:
      collect(*pending)
    return loglikelihoods, greedy
