import json
import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bt_jax.data import packing, pipeline, tokenizer as tok_lib
from tests.data.test_packing import parse_block_stream

SEQ_LEN, BLOCK_LEN = 32, 4


def make_docs(n=24):
  """Documents of varied length (some longer than a window), each unique."""
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "x", "y", "(", ")", "\n", "  ", "return", "def"]
  return [
    f"doc{i}: " + " ".join(rng.choice(words, size=int(rng.integers(0, 60)))) for i in range(n)
  ]


DOCS = make_docs()


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.train_bpe(DOCS * 3, vocab_size=300)


def rows(batches):
  """Concatenated rows of a list of batches, in order."""
  tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
  mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
  return tokens, mask


def epoch_orders(parsed_docs, tokenized, num_epochs):
  """Maps each parsed document back to its index; returns one list of indices per epoch."""
  index_of = {tuple(t.tolist()): i for i, t in enumerate(tokenized)}
  assert len(index_of) == len(tokenized), "test documents must tokenize differently"
  order = [index_of[tuple(d)] for d in parsed_docs]
  n = len(tokenized)
  return [order[e * n : (e + 1) * n] for e in range(num_epochs)]


def test_block_pipeline_stream_matches_packing(tokenizer):
  tokenized = pipeline.TokenizedDocuments(DOCS, tokenizer)
  it = pipeline.make_train_iterator(
    tokenized,
    tokenizer,
    seq_len=SEQ_LEN,
    block_len=BLOCK_LEN,
    batch_size=1,
    seed=7,
    num_epochs=2,
    shuffle_window=1,
  )
  batches = list(it)
  for b in batches:
    assert b["tokens"].shape == (1, SEQ_LEN) and b["tokens"].dtype == np.int32
    assert b["mask"].shape == (1, SEQ_LEN) and b["mask"].dtype == np.int32
  tokens, mask = rows(batches)
  parsed, left_pads = parse_block_stream(tokens, mask, BLOCK_LEN)
  first, second = epoch_orders(parsed, tokenized, 2)
  assert sorted(first) == sorted(second) == list(range(len(DOCS)))
  assert first != second, "each epoch gets its own document order"
  assert left_pads == [packing.left_pad_length(7, k, BLOCK_LEN) for k in range(2 * len(DOCS))]
  # The same windows as the reference packer fed with that document order.
  expected = list(
    packing.pack_block_aligned(
      [tokenized[i] for i in first + second],
      SEQ_LEN,
      BLOCK_LEN,
      tokenizer.eos_id,
      tokenizer.pad_id,
      seed=7,
    )
  )
  np.testing.assert_array_equal(
    tokens, rows([{k: v[None] for k, v in w.items()} for w in expected])[0]
  )
  assert tokenized.num_cached() == len(DOCS)


def test_plain_pipeline_stream(tokenizer):
  tokenized = pipeline.TokenizedDocuments(DOCS, tokenizer)
  batches = list(
    pipeline.make_train_iterator(
      tokenized,
      tokenizer,
      seq_len=SEQ_LEN,
      block_len=None,
      batch_size=1,
      seed=1,
      packing="plain",
      num_epochs=1,
      shuffle_window=1,
    )
  )
  tokens, mask = rows(batches)
  n = int(mask.sum())
  assert (mask[:n] == 1).all() and (mask[n:] == 0).all()
  ends = np.flatnonzero(tokens[:n] == tokenizer.eos_id)
  parsed = np.split(tokens[:n], ends + 1)[:-1]
  order = epoch_orders([p[:-1].tolist() for p in parsed], tokenized, 1)[0]
  assert sorted(order) == list(range(len(DOCS)))


def test_batches_shuffled_windows_and_tokenized_once(tokenizer):
  calls = []

  class CountingTokenizer(tok_lib.Tokenizer):
    def encode(self, text):
      calls.append(text)
      return super().encode(text)

  counting = CountingTokenizer(tokenizer.hf_tokenizer)
  kwargs = dict(seq_len=SEQ_LEN, block_len=BLOCK_LEN, batch_size=4, seed=0)
  it = pipeline.make_train_iterator(DOCS, counting, shuffle_window=8, **kwargs)
  batches = take(it, 40)  # several epochs
  assert sorted(calls) == sorted(DOCS), "each document is tokenized exactly once"
  for batch in batches:
    assert batch["tokens"].shape == (4, SEQ_LEN) and batch["mask"].shape == (4, SEQ_LEN)
    assert (batch["tokens"][batch["mask"] == 0] == tokenizer.pad_id).all(), (
      "pads, and only pads, are masked"
    )
    # Per block: pads, then scored tokens, then pads; a scored EOS is the block's last scored
    # token. So no block holds the end of one document and the start of another.
    for tokens, mask in zip(
      batch["tokens"].reshape(-1, BLOCK_LEN), batch["mask"].reshape(-1, BLOCK_LEN)
    ):
      scored = np.flatnonzero(mask)
      if scored.size:
        assert (np.diff(scored) == 1).all()
        eos = scored[tokens[scored] == tokenizer.eos_id]
        assert eos.size <= 1 and (eos.size == 0 or eos[0] == scored[-1])
  # Window shuffling permutes windows within groups of 8 (2 batches of 4).
  unshuffled = take(pipeline.make_train_iterator(DOCS, tokenizer, shuffle_window=1, **kwargs), 4)
  for group in range(2):
    a = np.concatenate([b["tokens"] for b in batches[2 * group : 2 * group + 2]])
    b = np.concatenate([b["tokens"] for b in unshuffled[2 * group : 2 * group + 2]])
    assert sorted(map(bytes, a)) == sorted(map(bytes, b)) and not np.array_equal(a, b)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["mask"], y["mask"])


@pytest.mark.parametrize("packing_kind,shuffle_window", [("block", 8), ("plain", 1)])
def test_state_restore_continues_exactly(tokenizer, packing_kind, shuffle_window):
  kwargs = dict(
    seq_len=SEQ_LEN,
    block_len=BLOCK_LEN,
    batch_size=3,
    seed=5,
    packing=packing_kind,
    shuffle_window=shuffle_window,
  )
  it = pipeline.make_train_iterator(DOCS, tokenizer, **kwargs)
  for skip in (1, 4, 9):  # positions inside and across windows, shuffle windows and epochs
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (grain's orbax handler)
    expected = take(it, 6)
    fresh = pipeline.make_train_iterator(
      DOCS, tokenizer, **kwargs
    )  # fresh cache, like a new process
    fresh.set_state(state)
    assert_same_batches(take(fresh, 6), expected)


def test_orbax_checkpoint_of_iterator(tokenizer, tmp_path):
  kwargs = dict(seq_len=SEQ_LEN, block_len=BLOCK_LEN, batch_size=2, seed=3, shuffle_window=4)
  it = pipeline.make_train_iterator(DOCS, tokenizer, **kwargs)
  take(it, 5)
  params = {"w": np.arange(6, dtype=np.float32)}
  state_at_save = json.loads(json.dumps(it.get_state()))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(
      5,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)
      ),
    )
    expected = take(it, 7)  # keeps training while the save may still be in flight
    mngr.wait_until_finished()
  saved = json.loads((tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").read_text())
  assert saved == state_at_save, "the state of the moment of the save, not a later one"
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 5
    fresh = pipeline.make_train_iterator(DOCS, tokenizer, **kwargs)
    restored = mngr.restore(
      5,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)
      ),
    )
  np.testing.assert_array_equal(restored.state["w"], params["w"])
  assert restored.data is fresh
  assert not np.array_equal(
    take(pipeline.make_train_iterator(DOCS, tokenizer, **kwargs), 1)[0]["tokens"],
    expected[0]["tokens"],
  ), "a fresh iterator starts elsewhere"
  assert_same_batches(take(fresh, 7), expected)


def test_eval_batches(tokenizer):
  tokenized = pipeline.TokenizedDocuments(DOCS, tokenizer)
  kwargs = dict(seq_len=SEQ_LEN, block_len=BLOCK_LEN, batch_size=4)
  everything = pipeline.make_eval_batches(tokenized, tokenizer, **kwargs)
  assert_same_batches(everything, pipeline.make_eval_batches(DOCS, tokenizer, **kwargs))
  windows = list(packing.pack_block_aligned(tokenized, SEQ_LEN, BLOCK_LEN, 0, 0, seed=0))
  assert len(everything) == math.ceil(len(windows) / 4)
  tokens, mask = rows(everything)
  parsed, _ = parse_block_stream(tokens, mask, BLOCK_LEN)
  assert parsed == [t.tolist() for t in tokenized], "documents in corpus order, each once"
  padding_rows = len(everything) * 4 - len(windows)
  if padding_rows:
    assert (everything[-1]["mask"][-padding_rows:] == 0).all()
  two = pipeline.make_eval_batches(DOCS, tokenizer, num_batches=2, **kwargs)
  assert len(two) == 2
  assert_same_batches(two, everything[:2])
  plain = pipeline.make_eval_batches(
    DOCS, tokenizer, seq_len=SEQ_LEN, block_len=None, batch_size=4, packing="plain"
  )
  assert int(sum(b["mask"].sum() for b in plain)) == sum(len(t) + 1 for t in tokenized)


def test_unigram_cross_entropy_exact():
  # Train counts [1, 2, 1, 0] over V = 4 -> add-one probabilities [2, 3, 2, 1] / 8.
  train = [np.array([0, 1]), np.array([1, 2])]
  valid = [np.array([1, 3])]
  expected = -(math.log(3 / 8) + math.log(1 / 8)) / 2
  assert pipeline.unigram_cross_entropy(train, valid, 4) == pytest.approx(expected, rel=1e-12)
  # Batches with masks: masked tokens count on neither side.
  train_batch = {"tokens": np.array([[0, 1, 1, 2, 3, 3]]), "mask": np.array([[1, 1, 1, 1, 0, 0]])}
  valid_batch = {"tokens": np.array([[1, 3, 2]]), "mask": np.array([[1, 1, 0]])}
  assert pipeline.unigram_cross_entropy([train_batch], [valid_batch], 4) == pytest.approx(
    expected, rel=1e-12
  )
  with pytest.raises(ValueError, match="token id 4 .*0..3"):
    pipeline.unigram_cross_entropy([np.array([4])], valid, 4)


def test_shards_partition_documents(tokenizer):
  tokenized = pipeline.TokenizedDocuments(DOCS, tokenizer)
  seen = []
  for shard in range(3):
    batches = list(
      pipeline.make_train_iterator(
        tokenized,
        tokenizer,
        seq_len=SEQ_LEN,
        block_len=BLOCK_LEN,
        batch_size=1,
        seed=2,
        num_epochs=1,
        shuffle_window=1,
        shard_index=shard,
        shard_count=3,
      )
    )
    parsed, _ = parse_block_stream(*rows(batches), BLOCK_LEN)
    seen.extend(parsed)
  assert sorted(map(tuple, seen)) == sorted(tuple(t.tolist()) for t in tokenized)


def test_pipeline_errors(tokenizer):
  with pytest.raises(ValueError, match="seq_len=30 must be a positive multiple of block_len=4"):
    pipeline.make_train_iterator(DOCS, tokenizer, seq_len=30, block_len=4, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="unknown packing 'blocks'"):
    pipeline.make_eval_batches(
      DOCS, tokenizer, seq_len=32, block_len=4, batch_size=2, packing="blocks"
    )
  with pytest.raises(ValueError, match="empty corpus"):
    pipeline.make_train_iterator([], tokenizer, seq_len=32, block_len=4, batch_size=2, seed=0)
