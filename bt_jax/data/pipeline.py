"""Training and evaluation batches, through grain.

    train_docs = TokenizedDocuments(stdlib_corpus("train"), tokenizer)
    train_iter = make_train_iterator(train_docs, tokenizer, seq_len=2048, block_len=4,
                                     batch_size=32, seed=0)
    batch = next(train_iter)   # {"tokens": int32 [32, 2048], "mask": int32 [32, 2048]}

The train pipeline (grain):

    MapDataset.source(tokenized documents)[shard_index::shard_count]
      .shuffle(seed).repeat(num_epochs)   # a fresh document order each epoch
      .map_with_index(segment)            # + left pad r(seed, stream index), EOS, right pad
      .to_iter_dataset()
    -> PackIterDataset                    # concatenate, cut into seq_len windows
    -> WindowShuffleIterDataset           # mix windows (a long file spans many)
    -> batch(batch_size, drop_remainder=True)

`make_train_iterator` returns the grain `DatasetIterator` itself, so its
`get_state()/set_state()` (a small JSON-able dict) and grain's orbax handler
(`grain.checkpoint.CheckpointSave/CheckpointRestore`) checkpoint it; a restored
iterator yields exactly the batches the original would have. With orbax:

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    train_iter = restored.data   # the same object, now at the saved position
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from bt_jax.data import packing as packing_lib
from bt_jax.data.tokenizer import Tokenizer

PACKINGS = ("block", "plain")


class TokenizedDocuments(Sequence[np.ndarray]):
  """Documents as int32 token arrays, each tokenized once (cached) when first indexed.

  Share one instance between training epochs, evaluation and statistics. Pass
  `cache=False` for corpora too large to hold in memory as tokens.
  """

  def __init__(self, documents: Sequence[str], tokenizer: Tokenizer, *, cache: bool = True):
    if len(documents) == 0:
      raise ValueError(f"no documents to tokenize (empty corpus {documents!r})")
    self.documents = documents
    self.tokenizer = tokenizer
    self._cache: dict[int, np.ndarray] | None = {} if cache else None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.documents)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if index < 0:
      index += len(self)
    if self._cache is not None:
      cached = self._cache.get(index)
      if cached is not None:
        return cached
    tokens = np.asarray(self.tokenizer.encode(self.documents[index]), dtype=np.int32)
    if self._cache is not None:
      with self._lock:
        self._cache[index] = tokens
    return tokens

  def num_cached(self) -> int:
    return 0 if self._cache is None else len(self._cache)


def _as_tokenized(documents, tokenizer: Tokenizer) -> TokenizedDocuments:
  if isinstance(documents, TokenizedDocuments):
    return documents
  return TokenizedDocuments(documents, tokenizer)


def _check_packing(packing_kind: str, seq_len: int, block_len: int | None) -> None:
  if packing_kind not in PACKINGS:
    raise ValueError(f"unknown packing {packing_kind!r}; valid: {list(PACKINGS)}")
  if packing_kind == "block":
    if block_len is None:
      raise ValueError("packing='block' needs block_len")
    packing_lib.check_block_lengths(seq_len, block_len)
  elif seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")


class _SegmentFn:
  """(stream index, tokens) -> packed segment; a class so grain can name it in stats."""

  def __init__(self, packing_kind: str, block_len: int | None, eos_id: int, pad_id: int, seed: int):
    self.packing_kind = packing_kind
    self.block_len = block_len
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.seed = seed

  def __call__(self, index: int, tokens: np.ndarray) -> dict[str, np.ndarray]:
    if self.packing_kind == "block":
      left_pad = packing_lib.left_pad_length(self.seed, index, self.block_len)
      seg_tokens, seg_mask = packing_lib.block_aligned_segment(
        tokens, left_pad, self.block_len, self.eos_id, self.pad_id
      )
    else:
      seg_tokens, seg_mask = packing_lib.plain_segment(tokens, self.eos_id)
    return {"tokens": seg_tokens, "mask": seg_mask}


class PackIterDataset(grain.IterDataset):
  """Concatenates segments {"tokens", "mask"} and cuts them into seq_len windows."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> grain.DatasetIterator:
    return _PackDatasetIterator(self._parent.__iter__(), seq_len=self._seq_len, pad_id=self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


class _PackDatasetIterator(grain.DatasetIterator):
  """State: the parent's position before the segment being cut, and the offset into it.

  Between windows at most one segment's tail is pending (packing_lib.WindowCutter), so
  restoring re-reads that one segment and skips `offset` tokens: exact, and the
  state stays a few integers however long the documents are.
  """

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._cutter = packing_lib.WindowCutter(seq_len, pad_id)
    self._remainder_parent_state: Any = None

  def _pull(self) -> packing_lib.Segment | None:
    state = self._parent.get_state()
    try:
      segment = next(self._parent)
    except StopIteration:
      return None
    self._remainder_parent_state = state
    return segment["tokens"], segment["mask"]

  def __next__(self) -> dict[str, np.ndarray]:
    window = self._cutter.next_window(self._pull)
    if window is None:
      raise StopIteration
    return window

  def get_state(self) -> dict[str, Any]:
    if self._cutter.remainder is None:
      return {"parent": self._parent.get_state(), "has_remainder": False, "offset": 0}
    return {
      "parent": copy.deepcopy(self._remainder_parent_state),
      "has_remainder": True,
      "offset": int(self._cutter.offset),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._cutter.remainder, self._cutter.offset = None, 0
    if state["has_remainder"]:
      segment = self._pull()
      if segment is None:
        raise ValueError(
          f"cannot restore packing state {state}: the source ended before the saved segment"
        )
      self._cutter.remainder, self._cutter.offset = segment, int(state["offset"])

  def __str__(self) -> str:
    return "PackDatasetIterator"


def make_train_dataset(
  documents: Sequence[str] | TokenizedDocuments,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  block_len: int | None,
  batch_size: int,
  seed: int,
  packing: str = "block",
  num_epochs: int | None = None,
  shuffle_window: int = 256,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
) -> grain.IterDataset:
  """The grain IterDataset of training batches (see the module docstring).

  packing: "block" (block-aligned, random left pad; block_len required) or
    "plain" (vanilla models; block_len ignored).
  num_epochs: None repeats forever; otherwise the last partial batch is dropped.
  shuffle_window: windows mixed together (<= 1: no mixing, windows in stream order).
  shard_index/shard_count: this process takes documents shard_index::shard_count.
    Each shard is then packed into its own stream, so the batches depend on
    the shard count. `bt_jax.train` does not shard: every process packs the
    whole stream and keeps its devices' rows of each global batch, which is
    the same for any process count (docs/sweeps.md, "Multi-host trials").
  """
  _check_packing(packing, seq_len, block_len)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32)")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  tokenized = _as_tokenized(documents, tokenizer)
  docs = grain.MapDataset.source(tokenized)
  if shard_count > 1:
    docs = docs[shard_index::shard_count]
    if len(docs) == 0:
      raise ValueError(
        f"shard {shard_index} of {shard_count} has no documents ({len(tokenized)} in all)"
      )
  segments = (
    docs.shuffle(seed=seed)
    .repeat(num_epochs)
    .map_with_index(_SegmentFn(packing, block_len, tokenizer.eos_id, tokenizer.pad_id, seed))
  )
  read_options = grain.ReadOptions(
    num_threads=num_threads, prefetch_buffer_size=max(16, 4 * num_threads)
  )
  windows = PackIterDataset(
    segments.to_iter_dataset(read_options), seq_len=seq_len, pad_id=tokenizer.pad_id
  )
  if shuffle_window > 1:
    windows = grain.experimental.WindowShuffleIterDataset(
      windows, window_size=shuffle_window, seed=seed
    )
  return windows.batch(batch_size, drop_remainder=True)


def make_train_iterator(
  documents: Sequence[str] | TokenizedDocuments,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  block_len: int | None,
  batch_size: int,
  seed: int,
  packing: str = "block",
  num_epochs: int | None = None,
  shuffle_window: int = 256,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
) -> grain.DatasetIterator:
  """An iterator of {"tokens": int32 [batch_size, seq_len], "mask": int32 [batch_size, seq_len]}.

  A grain DatasetIterator: checkpoint it with get_state()/set_state() or grain's
  orbax handler (module docstring). Arguments as in `make_train_dataset`.
  """
  return iter(
    make_train_dataset(
      documents,
      tokenizer,
      seq_len=seq_len,
      block_len=block_len,
      batch_size=batch_size,
      seed=seed,
      packing=packing,
      num_epochs=num_epochs,
      shuffle_window=shuffle_window,
      shard_index=shard_index,
      shard_count=shard_count,
      num_threads=num_threads,
    )
  )


def make_eval_batches(
  documents: Sequence[str] | TokenizedDocuments,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  block_len: int | None,
  batch_size: int,
  num_batches: int | None = None,
  packing: str = "block",
  seed: int = 0,
) -> list[dict[str, np.ndarray]]:
  """A fixed list of evaluation batches over the documents, in order (no shuffling).

  The same on every call and in every run: documents in corpus order, left pads
  from `seed` (block packing). At most `num_batches` batches (None: all the
  documents); when the documents run out, the last batch is completed with rows
  of mask 0, so every batch is [batch_size, seq_len] and the loss, averaged over
  mask, counts each token once. Tokenizes only the documents it needs.
  """
  _check_packing(packing, seq_len, block_len)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_batches is not None and num_batches <= 0:
    raise ValueError(f"num_batches must be positive or None, got {num_batches}")
  tokenized = _as_tokenized(documents, tokenizer)
  docs = (tokenized[i] for i in range(len(tokenized)))
  if packing == "block":
    windows = packing_lib.pack_block_aligned(
      docs, seq_len, block_len, tokenizer.eos_id, tokenizer.pad_id, seed
    )
  else:
    windows = packing_lib.pack_plain(docs, seq_len, tokenizer.eos_id, tokenizer.pad_id)
  batches = []
  rows: list[dict[str, np.ndarray]] = []
  for window in windows:
    rows.append(window)
    if len(rows) == batch_size:
      batches.append(_stack(rows))
      rows = []
      if num_batches is not None and len(batches) == num_batches:
        return batches
  if rows:
    empty = {
      "tokens": np.full(seq_len, tokenizer.pad_id, np.int32),
      "mask": np.zeros(seq_len, np.int32),
    }
    batches.append(_stack(rows + [empty] * (batch_size - len(rows))))
  return batches


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([row[key] for row in rows]) for key in ("tokens", "mask")}


def _scored_tokens(item) -> np.ndarray:
  """The scored token ids of a token array, or of a {"tokens", "mask"} batch (mask == 1)."""
  if isinstance(item, dict):
    tokens = np.asarray(item["tokens"])
    mask = item.get("mask")
    return tokens.ravel() if mask is None else tokens[np.asarray(mask) == 1]
  return np.asarray(item).ravel()


def unigram_counts(items: Iterable, vocab_size: int) -> np.ndarray:
  counts = np.zeros(vocab_size, dtype=np.int64)
  for item in items:
    tokens = _scored_tokens(item).astype(np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
      bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
      raise ValueError(
        f"token id {bad} is outside the vocabulary; valid ids are 0..{vocab_size - 1}"
      )
    counts += np.bincount(tokens, minlength=vocab_size)
  return counts


def unigram_cross_entropy(
  train_token_arrays: Iterable, valid_token_arrays: Iterable, vocab_size: int
) -> float:
  """Cross-entropy (nats/token) on the validation tokens of an add-one unigram fitted on training tokens.

  Items are int token arrays (all tokens count) or batches {"tokens", "mask"}
  (only tokens with mask == 1 count, on both sides). The baseline a language
  model's eval loss should beat by a wide margin.
  """
  train_counts = unigram_counts(train_token_arrays, vocab_size)
  valid_counts = unigram_counts(valid_token_arrays, vocab_size)
  num_valid = int(valid_counts.sum())
  if num_valid == 0:
    raise ValueError("no validation tokens to score")
  log_probs = np.log(train_counts + 1.0) - np.log(float(train_counts.sum()) + vocab_size)
  return float(-(valid_counts * log_probs).sum() / num_valid)
