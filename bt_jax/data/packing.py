"""Packing tokenized documents into fixed-length training windows (numpy).

Block-aligned packing (the Block Transformer paper's training data), per document:

    [pad] * r   document tokens   EOS   [pad] * (to the next block boundary)
    mask 0      mask 1            1     mask 0

with r drawn uniformly from 0..block_len-1. Every such *segment* is a multiple
of block_len long, and the segments are concatenated and cut into seq_len
windows (seq_len a multiple of block_len), so every block of every window lies
inside one document's segment: no block straddles two documents.

Long documents (longer than what is left of the current window): the segment
simply continues in the next window(s). The cut falls on a block boundary of
that same document, so the invariants hold and no token is dropped or repeated;
a continuation window starts mid-document without a left pad, exactly as a cut
of the concatenated stream would.

Plain packing (vanilla models): document tokens then EOS, all with mask 1,
concatenated and cut into windows.

In both, a final partial window is filled with pad tokens of mask 0.
Each window is `{"tokens": int32 [seq_len], "mask": int32 [seq_len]}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

Segment = tuple[np.ndarray, np.ndarray]  # (tokens int32 [n], mask int32 [n])
Example = dict[str, np.ndarray]


def check_block_lengths(seq_len: int, block_len: int) -> None:
  if block_len <= 0:
    raise ValueError(f"block_len must be positive, got {block_len}")
  if seq_len <= 0 or seq_len % block_len:
    raise ValueError(f"seq_len={seq_len} must be a positive multiple of block_len={block_len}")


def left_pad_length(seed: int, doc_index: int, block_len: int) -> int:
  """The random left pad r in 0..block_len-1 of the doc_index-th document of a stream.

  A pure function of (seed, doc_index), so a stream can be resumed anywhere.
  """
  return int(np.random.default_rng((int(seed), int(doc_index))).integers(block_len))


def block_aligned_segment(
  tokens, left_pad: int, block_len: int, eos_id: int, pad_id: int
) -> Segment:
  """[pad]*left_pad + tokens + [EOS] + right pad to a multiple of block_len, and its mask."""
  tokens = np.asarray(tokens, dtype=np.int32)
  if not 0 <= left_pad < block_len:
    raise ValueError(f"left_pad={left_pad} must be in 0..{block_len - 1}")
  used = left_pad + tokens.size + 1
  length = -(-used // block_len) * block_len
  out_tokens = np.full(length, pad_id, dtype=np.int32)
  out_mask = np.zeros(length, dtype=np.int32)
  out_tokens[left_pad : left_pad + tokens.size] = tokens
  out_tokens[used - 1] = eos_id
  out_mask[left_pad:used] = 1
  return out_tokens, out_mask


def plain_segment(tokens, eos_id: int) -> Segment:
  """tokens + [EOS], all scored."""
  tokens = np.asarray(tokens, dtype=np.int32)
  out_tokens = np.append(tokens, np.int32(eos_id)).astype(np.int32)
  return out_tokens, np.ones(out_tokens.size, dtype=np.int32)


class WindowCutter:
  """Cuts a stream of segments into seq_len windows.

  Between windows it holds at most the unconsumed tail of one segment
  (`remainder`, `offset`), which is what makes the stream resumable: the grain
  iterator in pipeline.py saves the source position of that segment and the offset.
  """

  def __init__(self, seq_len: int, pad_id: int):
    if seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.seq_len = seq_len
    self.pad_id = pad_id
    self.remainder: Segment | None = None
    self.offset = 0

  def next_window(self, pull: Callable[[], Segment | None]) -> Example | None:
    """The next window, pulling segments with `pull()` (None when exhausted).

    Returns None when the stream is exhausted and nothing is left to emit.
    """
    tokens = np.full(self.seq_len, self.pad_id, dtype=np.int32)
    mask = np.zeros(self.seq_len, dtype=np.int32)
    filled = 0
    while filled < self.seq_len:
      if self.remainder is None:
        segment = pull()
        if segment is None:
          break
        self.remainder, self.offset = segment, 0
      seg_tokens, seg_mask = self.remainder
      take = min(self.seq_len - filled, seg_tokens.size - self.offset)
      tokens[filled : filled + take] = seg_tokens[self.offset : self.offset + take]
      mask[filled : filled + take] = seg_mask[self.offset : self.offset + take]
      filled += take
      self.offset += take
      if self.offset == seg_tokens.size:
        self.remainder, self.offset = None, 0
    if filled == 0:
      return None
    return {"tokens": tokens, "mask": mask}


def pack_segments(segments: Iterable[Segment], seq_len: int, pad_id: int) -> Iterator[Example]:
  cutter = WindowCutter(seq_len, pad_id)
  iterator = iter(segments)
  while (window := cutter.next_window(lambda: next(iterator, None))) is not None:
    yield window


def pack_block_aligned(
  docs_token_ids: Iterable[Iterable[int]],
  seq_len: int,
  block_len: int,
  eos_id: int,
  pad_id: int,
  seed: int,
) -> Iterator[Example]:
  """Block-aligned windows of the documents, in order (see the module docstring).

  The k-th document gets the left pad `left_pad_length(seed, k, block_len)`.
  """
  check_block_lengths(seq_len, block_len)
  segments = (
    block_aligned_segment(doc, left_pad_length(seed, k, block_len), block_len, eos_id, pad_id)
    for k, doc in enumerate(docs_token_ids)
  )
  return pack_segments(segments, seq_len, pad_id)


def pack_plain(
  docs_token_ids: Iterable[Iterable[int]],
  seq_len: int,
  eos_id: int,
  pad_id: int,
) -> Iterator[Example]:
  """Documents each followed by EOS, concatenated and cut into windows (vanilla models)."""
  return pack_segments((plain_segment(doc, eos_id) for doc in docs_token_ids), seq_len, pad_id)
