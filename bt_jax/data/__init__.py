"""Data: corpora, tokenizer, packing and the grain training/eval pipelines.

    train_docs = load_corpus("stdlib", "train", max_bytes=2_000_000)
    valid_docs = load_corpus("stdlib", "validation")
    tokenizer = load_or_train_tokenizer(workdir, lambda: iter(train_docs), vocab_size=8192)
    train_iter = make_train_iterator(train_docs, tokenizer, seq_len=512, block_len=4,
                                     batch_size=16, seed=0)
    eval_batches = make_eval_batches(valid_docs, tokenizer, seq_len=512, block_len=4,
                                     batch_size=16, num_batches=8)

TFDS is imported only by `tfds_corpus` and `prepare_tfds`.
"""

from bt_jax.data.corpus import (
  DEFAULT_VALIDATION_FRACTION,
  SPLITS,
  TRAIN,
  VALIDATION,
  FileDocuments,
  TfdsDocuments,
  file_corpus,
  load_corpus,
  split_keys,
  stdlib_corpus,
  tfds_corpus,
)
from bt_jax.data.packing import (
  block_aligned_segment,
  left_pad_length,
  pack_block_aligned,
  pack_plain,
  plain_segment,
)
from bt_jax.data.pipeline import (
  PACKINGS,
  PackIterDataset,
  TokenizedDocuments,
  make_eval_batches,
  make_train_dataset,
  make_train_iterator,
  unigram_counts,
  unigram_cross_entropy,
)
from bt_jax.data.tokenizer import (
  EOS_TOKEN,
  Tokenizer,
  load_or_train_tokenizer,
  train_bpe,
)

__all__ = [
  "DEFAULT_VALIDATION_FRACTION",
  "SPLITS",
  "TRAIN",
  "VALIDATION",
  "FileDocuments",
  "TfdsDocuments",
  "file_corpus",
  "load_corpus",
  "split_keys",
  "stdlib_corpus",
  "tfds_corpus",
  "block_aligned_segment",
  "left_pad_length",
  "pack_block_aligned",
  "pack_plain",
  "plain_segment",
  "PACKINGS",
  "PackIterDataset",
  "TokenizedDocuments",
  "make_eval_batches",
  "make_train_dataset",
  "make_train_iterator",
  "unigram_counts",
  "unigram_cross_entropy",
  "EOS_TOKEN",
  "Tokenizer",
  "load_or_train_tokenizer",
  "train_bpe",
]
