import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from bt_jax.data import tokenizer as tok_lib

CORPUS = [
  "def add(a, b):\n    return a + b\n",
  "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
  "The quick brown fox jumps over the lazy dog. " * 20,
  "naïve café, 日本語のテキスト, emoji 🙂🚀 and tabs\tand\r\nnewlines\n",
] * 5

ROUND_TRIP = [
  "",
  " ",
  "hello world",
  "  leading and trailing spaces  ",
  "\n\n\ttabs\tand\r\nCRLF\r\n",
  "日本語 中文 한국어 Ελληνικά русский",
  "emoji 🙂🚀👩‍👩‍👧 and combining e\u0301 and zero width \u200b",
  "\x00\x01 control \x7f chars",
  "literal <|endoftext|> inside text",
  "unseen byte sequences: \U0001f9ec\U0001fab8 ƒ ß Ω",
]


@pytest.fixture(scope="module")
def trained():
  return tok_lib.train_bpe(CORPUS, vocab_size=400)


def test_train_bpe_ids(trained):
  assert trained.vocab_size == 400
  assert trained.eos_id == 0 and trained.pad_id == 0
  assert trained.hf_tokenizer.token_to_id("<|endoftext|>") == 0
  # Merges were learned: common text compresses below one token per byte.
  text = CORPUS[2]
  assert len(trained.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(trained, text):
  ids = trained.encode(text)
  assert all(isinstance(i, int) and 0 <= i < trained.vocab_size for i in ids)
  assert trained.decode(ids) == text


def test_encode_batch_matches_encode(trained):
  assert trained.encode_batch(ROUND_TRIP) == [trained.encode(t) for t in ROUND_TRIP]


def test_decode_rejects_unknown_ids(trained):
  with pytest.raises(ValueError, match="token id 400 .*0..399"):
    trained.decode([1, 400])


def test_small_corpus_fills_vocab_with_reserved_tokens():
  small = tok_lib.train_bpe(["ab ab"], vocab_size=300)
  assert small.vocab_size == 300 and small.eos_id == 0
  assert small.decode(small.encode("ab abc")) == "ab abc"
  with pytest.raises(ValueError, match="vocab_size=100"):
    tok_lib.train_bpe(["x"], vocab_size=100)


def test_save_and_from_file(trained, tmp_path):
  path = tmp_path / "tok" / "tokenizer.json"
  trained.save(path)
  loaded = tok_lib.Tokenizer.from_file(path)
  assert loaded.vocab_size == trained.vocab_size and loaded.eos_id == 0
  for text in ROUND_TRIP:
    assert loaded.encode(text) == trained.encode(text)


def _foreign_tokenizer(special_tokens):
  """A tokenizer.json as someone else might ship it: eos not at id 0."""
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=special_tokens,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  hf.train_from_iterator(CORPUS, trainer)
  return hf


def test_from_file_finds_eos_among_candidates(tmp_path):
  path = tmp_path / "s.json"
  _foreign_tokenizer(["<unk>", "<s>", "</s>"]).save(str(path))
  loaded = tok_lib.Tokenizer.from_file(path)
  assert loaded.eos_token == "</s>" and loaded.eos_id == 2 and loaded.pad_id == 2
  path = tmp_path / "none.json"
  _foreign_tokenizer(["<unk>"]).save(str(path))
  with pytest.raises(ValueError, match="none of the end-of-text tokens"):
    tok_lib.Tokenizer.from_file(path)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tok_lib.Tokenizer.from_file(tmp_path / "missing.json")


def test_load_or_train_caches(tmp_path):
  calls = []

  def texts():
    calls.append(1)
    return iter(CORPUS)

  first = tok_lib.load_or_train_tokenizer(tmp_path, texts, vocab_size=350)
  assert (tmp_path / "tokenizer.json").exists() and len(calls) == 1
  second = tok_lib.load_or_train_tokenizer(tmp_path, texts, vocab_size=350)
  assert len(calls) == 1, "the cached tokenizer must be reused"
  assert second.encode(CORPUS[3]) == first.encode(CORPUS[3])
  with pytest.raises(ValueError, match="vocab_size 350 but 512"):
    tok_lib.load_or_train_tokenizer(tmp_path, texts, vocab_size=512)


def test_load_or_train_with_given_file(trained, tmp_path):
  given = tmp_path / "given.json"
  trained.save(given)
  workdir = tmp_path / "run"
  tok = tok_lib.load_or_train_tokenizer(workdir, lambda: pytest.fail("must not train"), 512, given)
  assert tok.vocab_size == 400
  assert json.loads((workdir / "tokenizer.json").read_text()) == json.loads(given.read_text())
  with pytest.raises(ValueError, match="400 tokens but the model's vocab_size is 399"):
    tok_lib.load_or_train_tokenizer(tmp_path / "other", lambda: [], 399, given)
  different = tmp_path / "different.json"
  tok_lib.train_bpe(CORPUS[:2], 300).save(different)
  with pytest.raises(ValueError, match="different tokenizer"):
    tok_lib.load_or_train_tokenizer(workdir, lambda: [], 512, different)
