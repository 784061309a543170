"""Harness tokenisation rules, windows and buckets, and the brute-force
equivalence of the batched scorer for a vanilla and a block model."""

import os

import numpy as np
import pytest

from bt_jax.eval import tasks
from bt_jax.eval.scoring import (
  LoglikelihoodScorer,
  ScoreRequest,
  bucket_for,
  bucket_lengths,
  encode_pair,
  make_window,
)
from bt_jax.eval.zero_shot import doc_requests
from tests.utils import MAX_LEN, brute_force_loglikelihood, brute_force_rows

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_encode_pair_splits_the_joint_encoding(tokenizer):
  context, continuation = "Question: How do you open a jar?\nAnswer:", " Twist the lid."
  request = encode_pair(tokenizer, context, continuation)
  whole = tokenizer.encode(context + continuation)
  assert list(request.context_ids + request.continuation_ids) == whole
  assert list(request.context_ids) == whole[: len(tokenizer.encode(context))]


def test_encode_pair_moves_trailing_whitespace(tokenizer):
  request = encode_pair(tokenizer, "The dog  ", "sleeps")
  assert list(request.context_ids) == tokenizer.encode("The dog")
  assert (
    list(request.continuation_ids)
    == tokenizer.encode("The dog  sleeps")[len(tokenizer.encode("The dog")) :]
  )


def test_encode_pair_empty_context(tokenizer):
  request = encode_pair(tokenizer, "", "The dog")
  assert request == ScoreRequest((tokenizer.eos_id,), tuple(tokenizer.encode("The dog")))
  # A continuation that starts with end-of-text gives its first token as context.
  request = encode_pair(tokenizer, "", "<|endoftext|>The dog")
  assert request == ScoreRequest((tokenizer.eos_id,), tuple(tokenizer.encode("The dog")))


def test_make_window_truncates_left():
  request = ScoreRequest(tuple(range(1, 11)), (11, 12, 13))
  assert make_window(request, 100) == (list(range(1, 14)), 10)
  assert make_window(request, 5) == ([9, 10, 11, 12, 13], 2)
  assert make_window(request, 4) == ([10, 11, 12, 13], 1)
  with pytest.raises(ValueError, match="continuation of 3 tokens does not fit"):
    make_window(request, 3)


def test_buckets():
  assert bucket_lengths(2048, 64) == (64, 128, 256, 512, 1024, 2048)
  assert bucket_lengths(100, 32) == (32, 64, 100)
  assert bucket_for(33, (32, 64, 100)) == 64
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    bucket_for(101, (32, 64, 100))


def _requests(tokenizer):
  docs = (
    tasks.load_task("hellaswag", FIXTURES)
    + tasks.load_task("piqa", FIXTURES)
    + tasks.load_task("arc_easy", FIXTURES)
  )
  requests = [r for doc in docs for r in doc_requests(tokenizer, doc)]
  # Longer than the context: left truncation; and a long continuation.
  long_context = " ".join(docs[0].context for _ in range(6))
  requests.append(encode_pair(tokenizer, long_context, " starts pulling up roofing on a roof."))
  requests.append(encode_pair(tokenizer, "A man", " " + " ".join([docs[0].choices[3]] * 3)))
  requests.append(encode_pair(tokenizer, "A man", " is"))
  return requests


def test_scores_equal_brute_force(model_and_params, tokenizer):
  model, params = model_and_params
  requests = _requests(tokenizer)
  lengths = [len(r.context_ids) + len(r.continuation_ids) for r in requests]
  assert max(lengths) > MAX_LEN and min(lengths) <= 16  # two buckets, and truncation
  # Batch of 4 rows: partial batches, several buckets.
  scorer = LoglikelihoodScorer(model, params, batch_size=4, min_bucket=32, with_greedy=True)
  scores, greedy = scorer(requests, progress=False)
  expected = [
    brute_force_loglikelihood(model, params, r.context_ids, r.continuation_ids) for r in requests
  ]
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
  # The fixed-length brute force equals forwards of the exact (spec) length.
  for index in (-1, 0):  # a short request; a truncated one
    r = requests[index]
    exact = brute_force_loglikelihood(
      model, params, r.context_ids, r.continuation_ids, exact_length=True
    )
    np.testing.assert_allclose(scores[index], exact, rtol=1e-5, atol=1e-5)

  # is_greedy: every continuation token is the argmax of its prediction. Check
  # it on requests whose continuation is the model's own greedy choice.
  greedy_requests = []
  for r in requests[:3]:
    tokens = list(r.context_ids)
    for _ in range(2):
      tokens.append(int(np.argmax(brute_force_rows(model, params, tokens)[-1])))
    greedy_requests.append(ScoreRequest(r.context_ids, tuple(tokens[len(r.context_ids) :])))
  _, greedy_own = scorer(greedy_requests, progress=False)
  assert greedy_own.all()
  assert not greedy.all()


def test_scorer_rows_cap_by_tokens(model_and_params):
  model, params = model_and_params
  scorer = LoglikelihoodScorer(model, params, batch_size=8, max_batch_tokens=64, min_bucket=16)
  assert [scorer.rows_for(b) for b in scorer.buckets] == [4, 2, 1]


def test_out_of_vocabulary_ids_are_an_error(model_and_params):
  model, params = model_and_params
  scorer = LoglikelihoodScorer(model, params, batch_size=2)
  with pytest.raises(ValueError, match="token id 999 is outside the model vocabulary"):
    scorer([ScoreRequest((1, 2), (999,))], progress=False)
