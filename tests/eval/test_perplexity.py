"""Corpus reading, windows, and the loss by position against brute force."""

import gzip
import json

import numpy as np
import pytest

from bt_jax.data.tokenizer import train_bpe
from bt_jax.eval.perplexity import (PositionLoss, document_windows, loss_by_position,
                                    read_corpus, run_perplexity)
from tests.eval.conftest import TOKENIZER_TEXTS, VOCAB_SIZE, brute_force_logprobs, tiny_model

CONTEXT = 32


def test_read_corpus(tmp_path):
  (tmp_path / "a.txt").write_text("book one")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc two"}) + "\n\n"
                                    + json.dumps({"text": "doc three"}) + "\n")
  with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": "doc four"}) + "\n")
  assert read_corpus(str(tmp_path / "*")) == ["book one", "doc two", "doc three", "doc four"]
  assert read_corpus(str(tmp_path / "*"), max_docs=2) == ["book one", "doc two"]
  with pytest.raises(FileNotFoundError, match="no files match"):
    read_corpus(str(tmp_path / "*.parquet"))
  with pytest.raises(KeyError, match="no field 'body'"):
    read_corpus(str(tmp_path / "b.jsonl"), text_field="body")


def test_document_windows():
  docs = [list(range(10)), [7], [1, 2, 3, 4, 5]]
  assert list(document_windows(docs, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [1, 2, 3, 4]]


def test_binned():
  result = PositionLoss(context_len=5, loss_sum=np.array([0.0, 2.0, 4.0, 3.0, 1.0]),
                        count=np.array([0, 2, 2, 1, 1]), num_windows=2, num_docs=1)
  assert result.binned(2) == {"bin_size": 2, "start": [0, 2, 4], "end": [2, 4, 5],
                              "loss": [1.0, 7 / 3, 1.0], "count": [2, 3, 1]}
  assert result.loss == pytest.approx(10 / 6)


def test_loss_by_position_equals_brute_force(model_and_params, tokenizer):
  model, params = model_and_params
  texts = [" ".join(TOKENIZER_TEXTS), TOKENIZER_TEXTS[0], "A man"]
  result = loss_by_position(model, params, tokenizer, texts, context_len=CONTEXT, batch_size=4,
                            progress=False)
  loss_sum = np.zeros(CONTEXT)
  count = np.zeros(CONTEXT, int)
  docs = [[tokenizer.eos_id] + tokenizer.encode(text) for text in texts]
  windows = [d[i:i + CONTEXT] for d in docs for i in range(0, len(d), CONTEXT)]
  windows = [w for w in windows if len(w) >= 2]
  assert len(windows) > 4 and min(map(len, windows)) < CONTEXT  # padded batches and windows
  for window in windows:
    nll = -brute_force_logprobs(model, params, window)
    loss_sum[1:len(window)] += nll
    count[1:len(window)] += 1
  assert result.num_windows == len(windows)
  np.testing.assert_array_equal(result.count, count)
  np.testing.assert_allclose(result.loss_sum, loss_sum, rtol=1e-5, atol=1e-4)
  assert result.perplexity == pytest.approx(np.exp(loss_sum.sum() / count.sum()), rel=1e-5)


def test_run_perplexity_two_runs(tokenizer, tmp_path):
  (tmp_path / "corpus.txt").write_text(" ".join(TOKENIZER_TEXTS))
  runs = [(kind, *tiny_model(kind), tokenizer) for kind in ("vanilla", "block")]
  report = run_perplexity(runs, str(tmp_path / "*.txt"), out_dir=str(tmp_path / "out"),
                          context_len=CONTEXT, batch_size=4, bin_size=8, progress=False)
  saved = json.loads((tmp_path / "out" / "perplexity.json").read_text())
  assert saved == json.loads(json.dumps(report))
  assert [run["label"] for run in saved["runs"]] == ["vanilla", "block"]
  assert saved["runs"][1]["model_kind"] == "block"
  assert saved["runs"][0]["bins"]["start"] == [0, 8, 16, 24]
  png = (tmp_path / "out" / "loss_by_position.png").read_bytes()
  assert png.startswith(b"\x89PNG")


def test_run_perplexity_flags_different_tokenizers(tokenizer, tmp_path, capsys):
  (tmp_path / "corpus.txt").write_text(" ".join(TOKENIZER_TEXTS))
  other = train_bpe(TOKENIZER_TEXTS * 4, vocab_size=VOCAB_SIZE - 20)
  runs = [("a", *tiny_model("vanilla"), tokenizer), ("b", *tiny_model("vanilla"), other)]
  report = run_perplexity(runs, str(tmp_path / "*.txt"), context_len=CONTEXT, batch_size=4,
                          bin_size=8, progress=False)
  assert report["same_tokenizer"] is False
  assert "different tokenizers" in capsys.readouterr().out
