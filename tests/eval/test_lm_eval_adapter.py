"""The lm-evaluation-harness adapter, on hand-built Instances (the harness's
task data comes from a hub, unreachable here)."""

import os

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from bt_jax.eval import tasks  # noqa: E402
from bt_jax.eval.lm_eval_adapter import BtJaxLM  # noqa: E402
from bt_jax.eval.scoring import encode_pair  # noqa: E402
from bt_jax.eval.zero_shot import evaluate_zero_shot  # noqa: E402
from tests.utils import TOKENIZER_TEXTS, brute_force_loglikelihood, eval_model  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module", params=["vanilla", "block"])
def adapter(request, tokenizer):
  model, params = eval_model(request.param)
  return BtJaxLM(model=model, params=params, tokenizer=tokenizer, batch_size="4", min_bucket=32)


def _instances(task_docs):
  instances = []
  for task, docs in task_docs.items():
    for doc_id, doc in enumerate(docs):
      for i, continuation in enumerate(doc.continuations):
        instances.append(
          Instance(
            request_type="loglikelihood",
            doc={},
            idx=i,
            arguments=(doc.context, continuation),
            metadata=(task, doc_id, 1),
          )
        )
  return instances


def test_registered():
  assert get_model("bt_jax") is BtJaxLM


def test_loglikelihoods_equal_native(adapter, tokenizer):
  task_docs = {name: tasks.load_task(name, FIXTURES) for name in ("hellaswag", "piqa")}
  results = adapter.loglikelihood(_instances(task_docs), disable_tqdm=True)
  native = evaluate_zero_shot(
    adapter.model, adapter.params, tokenizer, task_docs, batch_size=4, progress=False
  )
  native_lls = [ll for name in task_docs for lls in native[name].loglikelihoods for ll in lls]
  np.testing.assert_allclose([ll for ll, _ in results], native_lls, rtol=1e-6, atol=1e-6)
  assert all(isinstance(g, bool) for _, g in results)


def test_adapter_on_a_mesh(tokenizer):
  """mesh_shape="1,1,1": params placed by the mesh rules, the same scores."""
  model, params = eval_model("vanilla")
  plain = BtJaxLM(
    model=model, params=params, tokenizer=tokenizer, batch_size="4", mesh_shape="none"
  )
  meshed = BtJaxLM(
    model=model, params=params, tokenizer=tokenizer, batch_size="4", mesh_shape="1,1,1"
  )
  assert meshed.scorer.sharding is not None and plain.scorer.sharding is None
  assert all(hasattr(x.sharding, "spec") for x in jax.tree.leaves(meshed.params))
  task_docs = {"piqa": tasks.load_task("piqa", FIXTURES)}
  want = plain.loglikelihood(_instances(task_docs), disable_tqdm=True)
  got = meshed.loglikelihood(_instances(task_docs), disable_tqdm=True)
  np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in want], rtol=1e-6)


def test_harness_tokenisation_equals_native(adapter, tokenizer):
  pairs = [
    ("Question: Why?\nAnswer:", " Because."),
    ("The dog  ", "sleeps"),
    ("", "The dog"),
    ("", "<|endoftext|>The dog"),
  ]
  instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  results = adapter.loglikelihood(instances, disable_tqdm=True)
  for (context, continuation), (ll, _) in zip(pairs, results):
    request = encode_pair(tokenizer, context, continuation)
    if context:
      assert adapter._encode_pair(context, continuation) == (  # pylint: disable=protected-access
        list(request.context_ids),
        list(request.continuation_ids),
      )
    expected = brute_force_loglikelihood(
      adapter.model, adapter.params, request.context_ids, request.continuation_ids
    )
    assert ll == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_loglikelihood_rolling(adapter, tokenizer):
  text = " ".join(TOKENIZER_TEXTS)  # longer than the 64-token context
  ids = tokenizer.encode(text)
  assert len(ids) > 2 * adapter.max_length
  short = TOKENIZER_TEXTS[0]
  instances = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate([text, short])]
  rolling = adapter.loglikelihood_rolling(instances, disable_tqdm=True)
  # Every token scored once; each with as much context as fits (63 tokens
  # before it, the first window conditioning on end-of-text).
  expected = 0.0
  context_len = adapter.max_length
  for start in range(0, len(ids), context_len - 1):
    end = min(start + context_len - 1, len(ids))
    context = [tokenizer.eos_id] if start == 0 else []
    window = (context + ids[:end])[-context_len:]
    expected += brute_force_loglikelihood(
      adapter.model,
      adapter.params,
      window[: len(window) - (end - start)],
      window[len(window) - (end - start) :],
    )
  assert rolling[0] == pytest.approx(expected, rel=1e-5)
  short_ids = tokenizer.encode(short)
  assert rolling[1] == pytest.approx(
    brute_force_loglikelihood(adapter.model, adapter.params, [tokenizer.eos_id], short_ids),
    rel=1e-5,
  )


def test_generate_until_is_not_supported(adapter):
  with pytest.raises(NotImplementedError, match="log-likelihoods only"):
    adapter.generate_until([Instance("generate_until", {}, ("Hi", {"until": ["\n"]}), 0)])


def test_constructor_errors(tokenizer):
  with pytest.raises(ValueError, match="needs workdir=DIR"):
    BtJaxLM(tokenizer=tokenizer)
  with pytest.raises(TypeError, match="unknown BtJaxLM arguments \\['pretrained'\\]"):
    BtJaxLM(pretrained="gpt2")
  with pytest.raises(ValueError, match="mesh_shape '2,2' must be 3 comma-separated ints"):
    BtJaxLM(tokenizer=tokenizer, mesh_shape="2,2")


_PIQA_TASK_YAML = """\
task: piqa_fixture
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_simple_evaluate_matches_native(tokenizer, tmp_path, monkeypatch):
  """The whole harness on a local copy of the piqa task (its YAML, our fixture
  data): same log-likelihoods, acc, acc_norm and stderr as the native evaluator."""
  import json

  import datasets
  from lm_eval.tasks import TaskManager

  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
  docs = tasks.load_task("piqa", FIXTURES)
  with open(os.path.join(FIXTURES, "valid.jsonl")) as f:
    records = [json.loads(line) for line in f]
  data = tmp_path / "piqa.jsonl"
  data.write_text("".join(json.dumps(dict(r, label=d.gold)) + "\n" for r, d in zip(records, docs)))
  (tmp_path / "piqa_fixture.yaml").write_text(
    _PIQA_TASK_YAML.format(data=data, cache=tmp_path / "cache")
  )
  model, params = eval_model("vanilla")
  lm = BtJaxLM(model=model, params=params, tokenizer=tokenizer, batch_size=4)
  out = lm_eval.simple_evaluate(
    model=lm,
    tasks=["piqa_fixture"],
    log_samples=True,
    task_manager=TaskManager(include_path=str(tmp_path)),
  )
  harness = out["results"]["piqa_fixture"]
  native = evaluate_zero_shot(
    model, params, tokenizer, {"piqa": docs}, batch_size=4, progress=False
  )["piqa"]
  for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
    assert harness[f"{metric},none"] == pytest.approx(getattr(native, metric))
  samples = sorted(out["samples"]["piqa_fixture"], key=lambda s: s["doc_id"])
  np.testing.assert_allclose(
    [[r[0][0] for r in s["resps"]] for s in samples], native.loglikelihoods, rtol=1e-6
  )
