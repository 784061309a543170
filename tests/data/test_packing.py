"""Packing invariants, checked by parsing the packed stream back into documents."""

import numpy as np
import pytest

from bt_jax.data import packing

EOS = 0
PAD = 0


def random_docs(rng, num_docs, max_len):
  """Token ids >= 1 so that EOS (0) only appears where packing put it; some empty, some long."""
  lengths = rng.integers(0, max_len, size=num_docs)
  lengths[::7] = 0
  lengths[3::11] = max_len * 5
  return [rng.integers(1, 1000, size=n).tolist() for n in lengths]


def parse_block_stream(tokens, mask, block_len):
  """Walks concatenated windows; returns (documents, left pads) and asserts the layout.

  Layout per document: r pads (mask 0, r < block_len), tokens + EOS (mask 1),
  pads to the next block boundary (mask 0, fewer than block_len).
  """
  docs, left_pads = [], []
  pos, n = 0, len(tokens)
  while pos < n:
    assert pos % block_len == 0, "a document segment must start on a block boundary"
    start = pos
    while pos < n and mask[pos] == 0:
      pos += 1
    if pos == n:  # trailing padding of the final partial window
      assert (tokens[start:] == PAD).all()
      break
    left = pos - start
    assert left < block_len, f"left pad {left} >= block_len"
    assert (tokens[start:pos] == PAD).all()
    left_pads.append(left)
    body_start = pos
    while tokens[pos] != EOS:
      assert mask[pos] == 1
      pos += 1
    assert mask[pos] == 1, "EOS must be scored"
    docs.append(tokens[body_start:pos].tolist())
    pos += 1
    end = -(-pos // block_len) * block_len
    assert (mask[pos:end] == 0).all() and (tokens[pos:end] == PAD).all()
    pos = end
  return docs, left_pads


def concat(windows):
  return (
    np.concatenate([w["tokens"] for w in windows]),
    np.concatenate([w["mask"] for w in windows]),
  )


@pytest.mark.parametrize("seq_len,block_len", [(64, 4), (48, 8), (16, 4)])
def test_block_packing_layout_and_content(seq_len, block_len):
  rng = np.random.default_rng(0)
  docs = random_docs(rng, 60, 40)
  windows = list(packing.pack_block_aligned(docs, seq_len, block_len, EOS, PAD, seed=3))
  for w in windows:
    assert w["tokens"].shape == (seq_len,) and w["tokens"].dtype == np.int32
    assert w["mask"].shape == (seq_len,) and w["mask"].dtype == np.int32
    assert set(np.unique(w["mask"])) <= {0, 1}
  tokens, mask = concat(windows)
  recovered, left_pads = parse_block_stream(tokens, mask, block_len)
  assert recovered == docs
  assert left_pads == [packing.left_pad_length(3, k, block_len) for k in range(len(docs))]
  # Exactly one EOS per document, all scored; every scored token is a document token or its EOS.
  assert int(((tokens == EOS) & (mask == 1)).sum()) == len(docs)
  assert int(mask.sum()) == sum(len(d) + 1 for d in docs)


def test_no_block_straddles_two_documents():
  rng = np.random.default_rng(1)
  docs = random_docs(rng, 80, 30)
  block_len, seq_len = 4, 32
  windows = list(packing.pack_block_aligned(docs, seq_len, block_len, EOS, PAD, seed=0))
  # Label every position with its document id by walking the stream; every block
  # must then see a single document (pad positions belong to their segment).
  tokens, mask = concat(windows)
  doc_of = np.full(tokens.size, -1)
  pos = 0
  for k, doc in enumerate(docs):
    r = packing.left_pad_length(0, k, block_len)
    seg_len = -(-(r + len(doc) + 1) // block_len) * block_len
    doc_of[pos : pos + seg_len] = k
    np.testing.assert_array_equal(tokens[pos + r : pos + r + len(doc)], doc)
    pos += seg_len
  assert (mask[pos:] == 0).all()
  blocks = doc_of[:pos].reshape(-1, block_len)
  assert (blocks == blocks[:, :1]).all()


def test_left_pads_cover_all_values_roughly_uniformly():
  block_len = 4
  docs = [[5, 6, 7]] * 4000
  windows = list(packing.pack_block_aligned(docs, 64, block_len, EOS, PAD, seed=11))
  _, left_pads = parse_block_stream(*concat(windows), block_len)
  counts = np.bincount(left_pads, minlength=block_len)
  assert len(left_pads) == 4000 and counts.min() > 0
  # Binomial(4000, 1/4): std ~27; 5 sigma.
  assert np.abs(counts - 1000).max() < 140, counts


def test_determinism_and_seed_dependence():
  docs = random_docs(np.random.default_rng(2), 40, 25)
  run = lambda seed: concat(list(packing.pack_block_aligned(docs, 32, 4, EOS, PAD, seed)))
  a, b, c = run(5), run(5), run(6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].shape != c[0].shape or not np.array_equal(a[1], c[1])


def test_final_partial_window_is_padded_and_masked():
  windows = list(packing.pack_block_aligned([[1, 2, 3]], 16, 4, eos_id=9, pad_id=7, seed=0))
  assert len(windows) == 1
  w = windows[0]
  r = packing.left_pad_length(0, 0, 4)
  expected = np.full(16, 7)
  expected[r : r + 4] = [1, 2, 3, 9]
  np.testing.assert_array_equal(w["tokens"], expected)
  np.testing.assert_array_equal(w["mask"], (np.arange(16) >= r) & (np.arange(16) < r + 4))


def test_long_document_continues_across_windows():
  doc = list(range(1, 101))  # 100 tokens, seq_len 16
  windows = list(packing.pack_block_aligned([doc, [7]], 16, 4, EOS, PAD, seed=0))
  tokens, mask = concat(windows)
  recovered, _ = parse_block_stream(tokens, mask, 4)
  assert recovered == [doc, [7]]
  assert len(windows) == -(-tokens.size // 16)


def test_block_packing_rejects_misaligned_lengths():
  with pytest.raises(ValueError, match="seq_len=30.*block_len=4"):
    list(packing.pack_block_aligned([[1]], 30, 4, EOS, PAD, seed=0))


def test_plain_packing():
  docs = random_docs(np.random.default_rng(3), 30, 20)
  windows = list(packing.pack_plain(docs, 24, eos_id=0, pad_id=0))
  tokens, mask = concat(windows)
  stream = [t for d in docs for t in d + [0]]
  n = len(stream)
  np.testing.assert_array_equal(tokens[:n], stream)
  assert (mask[:n] == 1).all() and (mask[n:] == 0).all() and (tokens[n:] == 0).all()
  assert len(windows) == -(-n // 24)
