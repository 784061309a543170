"""Byte-level BPE tokenizer: train one on a corpus, or load a tokenizer.json.

    tokenizer = train_bpe(texts, vocab_size=8192)       # "<|endoftext|>" is id 0
    tokenizer = Tokenizer.from_file("pythia/tokenizer.json")
    ids = tokenizer.encode("def f(x):\n  return x")
    assert tokenizer.decode(ids) == "def f(x):\n  return x"

Pad and EOS are the same token (as in Pythia: pad = eos = id 0 when we train).
`encode` never adds special tokens of its own (packing adds the EOS), and
`decode` keeps special tokens, so `decode(encode(s)) == s` for every str s
(a literal "<|endoftext|>" in the text encodes to the EOS id and decodes back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# Looked up in this order when loading a tokenizer.json someone else trained.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
# 256 byte symbols + the EOS token: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257


class Tokenizer:
  """A `tokenizers.Tokenizer` with the ids the data pipeline needs."""

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, eos_token: str | None = None):
    self._tokenizer = hf_tokenizer
    if eos_token is None:
      eos_token = next((t for t in EOS_CANDIDATES if hf_tokenizer.token_to_id(t) is not None), None)
      if eos_token is None:
        raise ValueError(
          f"the tokenizer has none of the end-of-text tokens {list(EOS_CANDIDATES)}; "
          "pass eos_token= naming the one it uses"
        )
    eos_id = hf_tokenizer.token_to_id(eos_token)
    if eos_id is None:
      raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    self.eos_token = eos_token
    self.eos_id = int(eos_id)
    self.pad_id = self.eos_id
    self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(
          f"token id {i} is outside the vocabulary; valid ids are 0..{self.vocab_size - 1}"
        )
    return self._tokenizer.decode(ids, skip_special_tokens=False)

  def to_json(self) -> str:
    return self._tokenizer.to_str()

  def save(self, path: str | os.PathLike) -> None:
    """Writes tokenizer.json atomically (a reader never sees half a file)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(self.to_json())
    os.replace(tmp, path)

  @classmethod
  def from_file(cls, path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    try:
      hf_tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception
      raise ValueError(f"{path!r} is not a tokenizers tokenizer.json: {e}") from e
    return cls(hf_tokenizer, eos_token)

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE with "<|endoftext|>" as id 0 and exactly `vocab_size` ids.

  Raw bytes are the alphabet and there is no normaliser, so every str round-trips.
  When the corpus is too small to learn `vocab_size - 257` merges, the remaining
  ids are filled with unused special tokens "<|reserved_k|>" so that the
  vocabulary size always equals the model's (and a cached tokenizer.json can be
  checked against it).
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(
      f"vocab_size={vocab_size} is too small for byte-level BPE; need >= {MIN_VOCAB_SIZE}"
    )
  hf_tokenizer = tokenizers.Tokenizer(models.BPE())
  hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf_tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  hf_tokenizer.train_from_iterator(texts, trainer)
  learned = hf_tokenizer.get_vocab_size(with_added_tokens=True)
  if learned < vocab_size:
    hf_tokenizer.add_special_tokens([f"<|reserved_{k}|>" for k in range(vocab_size - learned)])
  tokenizer = Tokenizer(hf_tokenizer, EOS_TOKEN)
  assert tokenizer.eos_id == 0 and tokenizer.vocab_size == vocab_size, tokenizer
  return tokenizer


def load_or_train_tokenizer(
  workdir: str | os.PathLike,
  texts_fn: Callable[[], Iterable[str]],
  vocab_size: int,
  tokenizer_path: str | os.PathLike | None = None,
) -> Tokenizer:
  """Returns the run's tokenizer, kept as `workdir/tokenizer.json`.

  - `tokenizer_path` given (e.g. Pythia's tokenizer.json): load it; the model's
    `vocab_size` must cover its ids (Pythia: 50277 tokens, model V = 50304). A
    copy is written to the workdir; a different tokenizer already there is an error.
  - otherwise reuse `workdir/tokenizer.json` when it exists (its vocabulary size
    must equal `vocab_size`), else train a byte-level BPE on `texts_fn()` and save it.

  Only one process should call this on a shared workdir (training writes the file).
  """
  cached_path = os.path.join(os.fspath(workdir), "tokenizer.json")
  if tokenizer_path is not None:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(
        f"tokenizer {os.fspath(tokenizer_path)!r} has {tokenizer.vocab_size} tokens but the model's "
        f"vocab_size is {vocab_size}; set vocab_size >= {tokenizer.vocab_size}"
      )
    if os.path.exists(cached_path):
      if _canonical_json(Tokenizer.from_file(cached_path).to_json()) != _canonical_json(
        tokenizer.to_json()
      ):
        raise ValueError(
          f"{cached_path!r} holds a different tokenizer than {os.fspath(tokenizer_path)!r}; "
          "this workdir was trained with the former: use a new workdir or drop tokenizer_path"
        )
    else:
      tokenizer.save(cached_path)
    return tokenizer
  if os.path.exists(cached_path):
    tokenizer = Tokenizer.from_file(cached_path)
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(
        f"cached tokenizer {cached_path!r} has vocab_size {tokenizer.vocab_size} but {vocab_size} was "
        "asked for; delete the file to retrain, or use a new workdir"
      )
    return tokenizer
  tokenizer = train_bpe(texts_fn(), vocab_size)
  tokenizer.save(cached_path)
  return tokenizer


def _canonical_json(text: str) -> str:
  return json.dumps(json.loads(text), sort_keys=True)
