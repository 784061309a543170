"""Corpus reading, windows, and the loss by position against brute force."""

import gzip
import json

import numpy as np
import pytest

from bt_jax.data.tokenizer import train_bpe
from bt_jax.cli import UserError
from bt_jax.eval.perplexity import (
  PositionLoss,
  loss_by_position,
  read_corpus,
  rolling_windows,
  run_perplexity,
)
from tests.utils import TOKENIZER_TEXTS, VOCAB_SIZE, brute_force_logprobs, eval_model

CONTEXT = 32


def test_read_corpus(tmp_path):
  (tmp_path / "a.txt").write_text("book one")
  (tmp_path / "b.jsonl").write_text(
    json.dumps({"text": "doc two"}) + "\n\n" + json.dumps({"text": "doc three"}) + "\n"
  )
  with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": "doc four"}) + "\n")
  assert read_corpus(str(tmp_path / "*")) == ["book one", "doc two", "doc three", "doc four"]
  assert read_corpus(str(tmp_path / "*"), max_docs=2) == ["book one", "doc two"]
  with pytest.raises(FileNotFoundError, match="no files match"):
    read_corpus(str(tmp_path / "*.parquet"))
  with pytest.raises(UserError, match="b.jsonl:1 has no field 'body'"):
    read_corpus(str(tmp_path / "b.jsonl"), text_field="body")
  with gzip.open(tmp_path / "d.txt.gz", "wb") as f:
    f.write("gzipped book".encode())
  assert read_corpus(str(tmp_path / "*.gz")) == ["doc four", "gzipped book"]
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
    read_corpus(str(tmp_path / "bad" / "*"))
  (tmp_path / "bad" / "latin1.txt").write_text("")
  (tmp_path / "bad" / "e.jsonl").write_text("")
  with pytest.raises(UserError, match="hold no documents"):
    read_corpus(str(tmp_path / "bad" / "*.jsonl"))


def test_training_and_eval_read_the_same_files(tmp_path):
  """One reader: the corpus of training (`files:<glob>`) and eval_perplexity's."""
  from bt_jax.data import corpus  # pylint: disable=import-outside-toplevel

  (tmp_path / "a.txt").write_text("book one")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": "doc two"}) + "\n")
  with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
    f.write("book three")
  pattern = str(tmp_path / "*")
  train = corpus.file_corpus(pattern, "train", validation_fraction=0.0)
  assert list(train) == list(read_corpus(pattern)) == ["book one", "doc two", "book three"]


@pytest.mark.parametrize("window_len", [2, 3, 5, 8])
def test_rolling_windows_are_lm_evals(window_len):
  """The windows of lm_eval.utils (rolling, then disjoint), and every token scored once."""
  lm_eval_utils = pytest.importorskip("lm_eval.utils")
  eos = 99
  for length in [
    0,
    1,
    2,
    window_len - 2,
    window_len - 1,
    window_len,
    window_len + 1,
    2 * window_len - 1,
    2 * window_len,
    3 * window_len + 2,
    17,
  ]:
    tokens = list(range(max(length, 0)))
    ours = list(rolling_windows(tokens, window_len, eos))
    theirs = [
      lm_eval_utils.make_disjoint_window(pair)
      for pair in lm_eval_utils.get_rolling_token_windows(
        tokens, prefix_token=eos, max_seq_len=window_len - 1, context_len=1
      )
    ]
    assert len(ours) == len(theirs), (length, ours, theirs)
    for (window, num_scored), (context, continuation) in zip(ours, theirs):
      assert len(window) <= window_len
      assert window == (context + continuation)[-window_len:]  # what the model sees
      assert window[len(window) - num_scored :] == continuation  # what is scored
    scored = [t for window, n in ours for t in window[len(window) - n :]]
    assert scored == tokens, (length, ours)


def test_binned():
  result = PositionLoss(
    context_len=5,
    loss_sum=np.array([0.0, 2.0, 4.0, 3.0, 1.0]),
    count=np.array([0, 2, 2, 1, 1]),
    num_windows=2,
    num_docs=1,
  )
  assert result.binned(2) == {
    "bin_size": 2,
    "start": [0, 2, 4],
    "end": [2, 4, 5],
    "loss": [1.0, 7 / 3, 1.0],
    "count": [2, 3, 1],
  }
  assert result.loss == pytest.approx(10 / 6)


def test_loss_by_position_equals_brute_force(model_and_params, tokenizer):
  model, params = model_and_params
  texts = [" ".join(TOKENIZER_TEXTS), TOKENIZER_TEXTS[0], "A man"]
  result = loss_by_position(
    model, params, tokenizer, texts, context_len=CONTEXT, batch_size=4, progress=False
  )
  loss_sum = np.zeros(CONTEXT)
  count = np.zeros(CONTEXT, int)
  windows = [
    w for text in texts for w in rolling_windows(tokenizer.encode(text), CONTEXT, tokenizer.eos_id)
  ]
  assert len(windows) > 4 and min(len(w) for w, _ in windows) < CONTEXT  # padded batches
  assert any(n < len(w) - 1 for w, n in windows)  # a last window with earlier context
  for window, num_scored in windows:
    nll = -brute_force_logprobs(model, params, window)
    loss_sum[len(window) - num_scored : len(window)] += nll[-num_scored:]
    count[len(window) - num_scored : len(window)] += 1
  assert result.num_windows == len(windows)
  assert count.sum() == sum(len(tokenizer.encode(text)) for text in texts)  # each token once
  np.testing.assert_array_equal(result.count, count)
  np.testing.assert_allclose(result.loss_sum, loss_sum, rtol=1e-5, atol=1e-4)
  assert result.perplexity == pytest.approx(np.exp(loss_sum.sum() / count.sum()), rel=1e-5)


def test_run_perplexity_two_runs(tokenizer, tmp_path):
  (tmp_path / "corpus.txt").write_text(" ".join(TOKENIZER_TEXTS))
  runs = [(kind, *eval_model(kind), tokenizer) for kind in ("vanilla", "block")]
  report = run_perplexity(
    runs,
    str(tmp_path / "*.txt"),
    out_dir=str(tmp_path / "out"),
    context_len=CONTEXT,
    batch_size=4,
    bin_size=8,
    progress=False,
  )
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
  runs = [("a", *eval_model("vanilla"), tokenizer), ("b", *eval_model("vanilla"), other)]
  report = run_perplexity(
    runs, str(tmp_path / "*.txt"), context_len=CONTEXT, batch_size=4, bin_size=8, progress=False
  )
  assert report["same_tokenizer"] is False
  assert "different tokenizers" in capsys.readouterr().out
