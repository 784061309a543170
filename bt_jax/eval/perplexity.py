"""Perplexity on a text corpus, and the loss by token position in the context.

As in the Block Transformer paper's PG19 study: every document is cut into
windows of the model's context length; the next-token loss at each position of
the window is averaged over all windows, then smoothed by averaging over bins
of positions. A model that uses its whole context keeps lowering the loss
towards the end of the window.

    result = loss_by_position(model, params, tokenizer, read_corpus("/data/pg19/*.txt"))
    plot_loss_by_position([("vanilla", result_a), ("block", result_b)], "loss.png")

Windows are lm-evaluation-harness's rolling loglikelihood windows
(`lm_eval.utils.get_rolling_token_windows` with context_len 1, then
`make_disjoint_window`), so every token of a document is scored exactly once:
the first window is an end-of-text token (as a document starts after its
predecessor in a training stream) and the document's first context_len - 1
tokens; each later window scores the next context_len - 1 tokens, conditioned
on the token before them; the last window scores what is left (one token or
more) and is filled from the left with earlier tokens as context, so it is
full length whenever the document is. A window is context_len tokens long and
scores at most context_len - 1 of them (the model's last output predicts
beyond the window), which is lm-eval's max_seq_len = context_len - 1.
Positions count from the window's start, so the last window's tokens sit at
late positions; `count` says how many tokens each position scored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
import numpy as np
from tqdm.auto import tqdm

from bt_jax.cli import UserError
from bt_jax.data import corpus
from bt_jax.eval.sharding import EvalSharding, eval_sharding
from bt_jax.eval.scoring import TokenizerLike
from bt_jax.models import token_logprobs


def read_corpus(
  pattern: str, *, text_field: str = "text", max_docs: Optional[int] = None
) -> list[str]:
  """Documents from a glob of files, read as training reads them
  (`bt_jax.data.corpus.read_files`: text files, one document each, or JSON
  lines, .gz allowed), but refusing a file that is not UTF-8. Read at once,
  so a bad file is reported before any model is loaded."""
  docs = corpus.read_files(pattern, text_field, strict=True)
  return list(docs[:max_docs] if max_docs else docs)


def rolling_windows(
  tokens: Sequence[int], window_len: int, prefix_token: int
) -> Iterator[tuple[list[int], int]]:
  """lm-eval's rolling loglikelihood windows of one document, as
  (window, num_scored): a window of at most `window_len` tokens whose last
  `num_scored` tokens are scored, each given the tokens before it in the
  window. Every token of `tokens` is scored once, in order (module docstring).
  """
  if window_len < 2:
    raise ValueError(f"window_len {window_len} must be at least 2")
  tokens = list(tokens)
  pred_len = window_len - 1  # lm-eval's max_seq_len: predictions per window
  if not tokens:
    return
  first = min(pred_len, len(tokens))
  yield [prefix_token] + tokens[:first], first
  predicted = first
  while predicted < len(tokens):
    scored = min(len(tokens) - predicted, pred_len)
    end = predicted + scored
    yield tokens[max(0, end - window_len) : end], scored
    predicted = end


@dataclasses.dataclass
class PositionLoss:
  """Summed next-token loss and counts at each window position."""

  context_len: int
  loss_sum: np.ndarray  # [context_len] float64
  count: np.ndarray  # [context_len] int64
  num_windows: int
  num_docs: int

  @property
  def num_tokens(self) -> int:
    return int(self.count.sum())

  @property
  def loss(self) -> float:
    return float(self.loss_sum.sum() / max(self.num_tokens, 1))

  @property
  def perplexity(self) -> float:
    return math.exp(self.loss)

  def mean_by_position(self) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.count > 0, self.loss_sum / np.maximum(self.count, 1), np.nan)

  def binned(self, bin_size: int) -> dict[str, list]:
    """Mean loss over bins [start, end) of positions (token-weighted)."""
    if bin_size <= 0:
      raise ValueError(f"bin_size must be positive, got {bin_size}")
    starts, ends, losses, counts = [], [], [], []
    for start in range(0, self.context_len, bin_size):
      end = min(start + bin_size, self.context_len)
      count = int(self.count[start:end].sum())
      if count == 0:
        continue
      starts.append(start)
      ends.append(end)
      counts.append(count)
      losses.append(float(self.loss_sum[start:end].sum() / count))
    return {"bin_size": bin_size, "start": starts, "end": ends, "loss": losses, "count": counts}

  def to_json(self, bin_size: int, **metadata: Any) -> dict[str, Any]:
    mean = self.mean_by_position()
    return dict(
      metadata,
      context_len=self.context_len,
      num_docs=self.num_docs,
      num_windows=self.num_windows,
      num_tokens=self.num_tokens,
      loss=self.loss,
      perplexity=self.perplexity,
      bins=self.binned(bin_size),
      per_position={
        "loss": [None if math.isnan(x) else float(x) for x in mean],
        "count": [int(c) for c in self.count],
      },
    )


def _window_nll(model, params, tokens, mask):
  """-log p per position [batch, length] and where it counts."""
  logprobs, valid = token_logprobs(model, params, tokens, mask)
  return -logprobs, valid


def loss_by_position(
  model: nn.Module,
  params: Any,
  tokenizer: TokenizerLike,
  texts: Sequence[str],
  *,
  context_len: Optional[int] = None,
  batch_size: int = 8,
  max_windows: Optional[int] = None,
  prepend_eos: bool = True,
  progress: bool = True,
  sharding: Optional[EvalSharding] = None,
  mesh: Optional[Mesh] = None,
) -> PositionLoss:
  """Next-token loss by position over lm-eval's rolling windows of
  `context_len` tokens (default: the model's context; see the module
  docstring): every token of every text is scored once. `prepend_eos` False
  starts a document's first window at its first token, which is then not
  scored. All batches share one shape [batch_size, context_len].
  With `mesh` (a (data, fsdp, tensor) mesh) or `sharding` the params are placed
  on the mesh and each batch is split over its data-parallel axes (batch_size
  rounded up to a multiple of them)."""
  sharding = eval_sharding(mesh, sharding)
  context_len = context_len or model.config.max_len
  if not 2 <= context_len <= model.config.max_len:
    raise ValueError(
      f"context_len {context_len} must be in [2, {model.config.max_len}] (the model's max_len)"
    )
  windows = []
  for text in texts:
    ids = list(tokenizer.encode(text))
    if prepend_eos:
      windows.extend(rolling_windows(ids, context_len, tokenizer.eos_id))
    elif len(ids) >= 2:
      windows.extend(rolling_windows(ids[1:], context_len, ids[0]))
  if max_windows:
    windows = windows[:max_windows]
  if not windows:
    raise UserError("the corpus gives no token to score; give documents with text")
  vocab_size = model.config.vocab_size
  nll_fn = functools.partial(_window_nll, model)
  if sharding is None:
    nll_fn = jax.jit(nll_fn)
  else:
    params = sharding.place_params(model, params)
    nll_fn = sharding.jit(nll_fn, model, num_batch_args=2)
    batch_size = sharding.rows(batch_size)
  loss_sum = np.zeros(context_len, np.float64)
  count = np.zeros(context_len, np.int64)
  pending = None  # the previous batch's results, read after the next is dispatched

  def collect(nll, valid, scored):
    nonlocal loss_sum, count
    nll = np.asarray(nll, np.float64)
    valid = np.array(valid) & scored  # scored is False on dummy rows
    loss_sum += np.where(valid, nll, 0.0).sum(axis=0)
    count += valid.sum(axis=0)

  starts = range(0, len(windows), batch_size)
  for start in tqdm(starts, desc="perplexity", disable=not progress, unit="batch"):
    chunk = windows[start : start + batch_size]
    tokens = np.zeros((batch_size, context_len), np.int32)
    mask = np.zeros((batch_size, context_len), np.int32)
    mask[:, 0] = 1
    scored = np.zeros((batch_size, context_len), bool)
    for row, (window, num_scored) in enumerate(chunk):
      tokens[row, : len(window)] = window
      mask[row, : len(window)] = 1
      scored[row, len(window) - num_scored : len(window)] = True
    if tokens.max() >= vocab_size:
      raise ValueError(
        f"token id {tokens.max()} is outside the model vocabulary (valid "
        f"0..{vocab_size - 1}); does the tokenizer match the model?"
      )
    result = (*nll_fn(params, tokens, mask), scored)
    if pending is not None:
      collect(*pending)  # the host builds the next batch while the device computes
    pending = result
  collect(*pending)
  return PositionLoss(
    context_len=context_len,
    loss_sum=loss_sum,
    count=count,
    num_windows=len(windows),
    num_docs=len(texts),
  )


def plot_loss_by_position(
  runs: Sequence[tuple[str, PositionLoss]],
  path: str,
  *,
  bin_size: int = 64,
  title: Optional[str] = None,
) -> None:
  """One line per run: binned mean loss against token position (bin centres)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, result in runs:
    bins = result.binned(bin_size)
    centres = [(a + b - 1) / 2 for a, b in zip(bins["start"], bins["end"])]
    ax.plot(centres, bins["loss"], marker=".", label=f"{label} (ppl {result.perplexity:.2f})")
  ax.set_xlabel("token position in the context window")
  ax.set_ylabel(f"loss (nats), mean over bins of {bin_size} positions")
  ax.set_title(title or "Loss by token position")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _tokenizer_key(tokenizer):
  """What makes two tokenizers the same: their serialized form when they have one."""
  to_json = getattr(tokenizer, "to_json", None)
  return to_json() if callable(to_json) else id(tokenizer)


def run_perplexity(
  runs: Sequence[tuple[str, nn.Module, Any, TokenizerLike]],
  data: str,
  *,
  out_dir: Optional[str] = None,
  text_field: str = "text",
  max_docs: Optional[int] = None,
  max_windows: Optional[int] = None,
  context_len: Optional[int] = None,
  batch_size: int = 8,
  bin_size: int = 64,
  prepend_eos: bool = True,
  progress: bool = True,
  sharding: Optional[EvalSharding] = None,
  mesh: Optional[Mesh] = None,
  texts: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
  """Loss by position for each (label, model, params, tokenizer) on the corpus
  `data` (or `texts`, its documents already read); prints a summary and, with
  out_dir, writes perplexity.json and loss_by_position.png (all runs on one
  plot)."""
  if texts is None:
    texts = read_corpus(data, text_field=text_field, max_docs=max_docs)
  results = []
  for label, model, params, tokenizer in runs:
    result = loss_by_position(
      model,
      params,
      tokenizer,
      texts,
      context_len=context_len,
      batch_size=batch_size,
      max_windows=max_windows,
      prepend_eos=prepend_eos,
      progress=progress,
      sharding=sharding,
      mesh=mesh,
    )
    results.append((label, model, result))
    print(
      f"{label}: perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats) over "
      f"{result.num_tokens} tokens, {result.num_windows} windows of {result.context_len}"
    )
  same_tokenizer = len({_tokenizer_key(run[3]) for run in runs}) == 1
  if not same_tokenizer:
    print(
      "note: the runs have different tokenizers; positions and perplexities are per "
      "token of each tokenizer, so they are not directly comparable"
    )
  report = {
    "data": data,
    "bin_size": bin_size,
    "same_tokenizer": same_tokenizer,
    "runs": [
      result.to_json(bin_size, label=label, model_kind=model.config.kind)
      for label, model, result in results
    ],
  }
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "perplexity.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    plot_loss_by_position(
      [(label, result) for label, _, result in results],
      os.path.join(out_dir, "loss_by_position.png"),
      bin_size=bin_size,
    )
  return report
