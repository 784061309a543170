"""Zero-shot scores of a converted model equal lm-evaluation-harness's own `hf`
model (transformers, torch CPU) on the HF folder it came from, on the small
local HellaSwag / PIQA / ARC files of tests/eval/fixtures."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the harness's model must not reach for the hub

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from bt_jax import convert  # noqa: E402
from bt_jax.checkpointing import load_for_inference  # noqa: E402
from bt_jax.eval import tasks  # noqa: E402
from bt_jax.eval.zero_shot import evaluate_zero_shot, predict  # noqa: E402
from tests.convert import hf_models  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "eval", "fixtures")


def test_zero_shot_equals_lm_eval_hf_model(tmp_path):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "wd")
  hf_models.save_hf_model(hf_dir, hf_models.gpt_neox_config(max_position_embeddings=256))
  convert.from_hf(hf_dir, workdir)
  task_docs = {name: tasks.load_task(name, FIXTURES) for name in ("hellaswag", "piqa", "arc_easy")}

  model, params, tokenizer = load_for_inference(workdir)
  ours = evaluate_zero_shot(model, params, tokenizer, task_docs, batch_size=8, progress=False)

  harness = HFLM(
    pretrained=hf_dir, tokenizer=hf_dir, device="cpu", batch_size=8, dtype="float32", max_length=256
  )
  instances = [
    Instance(
      request_type="loglikelihood",
      doc={},
      idx=i,
      arguments=(doc.context, " " + choice),
      metadata=(task, d, 1),
    )
    for task, docs in task_docs.items()
    for d, doc in enumerate(docs)
    for i, choice in enumerate(doc.choices)
  ]
  results = iter(ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True))
  for task, docs in task_docs.items():
    for doc, our_lls in zip(docs, ours[task].loglikelihoods):
      their_lls = [next(results) for _ in doc.choices]
      np.testing.assert_allclose(our_lls, their_lls, atol=1e-4, rtol=0)
      assert predict(our_lls, doc.choices) == predict(their_lls, doc.choices)
