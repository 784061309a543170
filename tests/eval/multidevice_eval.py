"""Sharded evaluation on forced CPU devices, against one device.

Run in its own process by test_sharded_eval.py (never import it from pytest):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/eval/multidevice_eval.py
Prints one JSON line per check ({"name", "ok", "detail"}), then a summary
line, and exits 1 if any check failed.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from bt_jax.eval.perplexity import loss_by_position
from bt_jax.eval.scoring import LoglikelihoodScorer, ScoreRequest
from bt_jax.eval.sharding import EvalSharding, eval_sharding_from_flag
from bt_jax.mesh import make_mesh
from bt_jax.models import build_model, init_params
from tests.multidevice import check, record, summary
from tests.utils import tiny_config

VOCAB = 128
CONFIGS = {
  "vanilla": tiny_config(
    "vanilla", vocab_size=VOCAB, num_layers=2, width=64, max_len=64, init_std=0.3
  ),
  "block-L4": tiny_config(
    "block",
    vocab_size=VOCAB,
    block_len=4,
    block_layers=2,
    block_width=64,
    token_layers=2,
    token_width=64,
    max_len=64,
    init_std=0.3,
  ),
}
MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}


class CharTokenizer:
  """Bytes as tokens (ids 2..VOCAB-1); enough to make windows of real text."""

  eos_id = 1

  def encode(self, text):
    return [2 + b % (VOCAB - 2) for b in text.encode()]


def requests():
  rng = np.random.default_rng(0)
  out = []
  # 11 requests of ragged lengths, some over the context (contexts truncated):
  # with batch_size 3, every batch has dummy rows after rounding to 8.
  for n in (3, 9, 17, 30, 5, 60, 63, 12, 1, 40, 22):
    ids = rng.integers(2, VOCAB, size=n + 3).tolist()
    out.append(ScoreRequest(tuple(ids[:3]), tuple(ids[3:])))
  return out


def check_model(name, config):
  model = build_model(config)
  params = init_params(model, jax.random.key(3))
  reqs = requests()
  want_ll, want_greedy = LoglikelihoodScorer(model, params, batch_size=3, with_greedy=True)(
    reqs, progress=False
  )
  texts = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A man sits on a roof.",
    "Which of these is a mammal? A whale, a shark, a trout or a frog. " * 2,
  ]
  want_ppl = loss_by_position(model, params, CharTokenizer(), texts, batch_size=3, progress=False)
  for mesh_name, shape in MESHES.items():

    def run(mesh_name=mesh_name, shape=shape):
      sharding = EvalSharding(make_mesh(shape))
      scorer = LoglikelihoodScorer(model, params, batch_size=3, with_greedy=True, sharding=sharding)
      assert (
        scorer.rows_for(32)
        == sharding.rows(3)
        == -(-3 // sharding.data_parallel) * sharding.data_parallel
      )
      # Parameters really are split: with fsdp/tensor > 1 no device holds all of a kernel.
      leaves = jax.tree.leaves(scorer.params)
      split = [x for x in leaves if x.addressable_shards[0].data.size < x.size]
      if shape[1] * shape[2] > 1:
        assert split, "no parameter is sharded"
      else:
        assert not split, "a data-only mesh should replicate the parameters"
      got_ll, got_greedy = scorer(reqs, progress=False)
      # Sums of up to 63 log-probs of ~-7 nats: compare relative to their size.
      err = float(np.max(np.abs(got_ll - want_ll) / np.maximum(1.0, np.abs(want_ll))))
      assert err < 1e-5, err
      np.testing.assert_array_equal(got_greedy, want_greedy)
      got_ppl = loss_by_position(
        model, params, CharTokenizer(), texts, batch_size=3, progress=False, sharding=sharding
      )
      np.testing.assert_array_equal(got_ppl.count, want_ppl.count)
      ppl_err = float(
        np.max(np.abs(got_ppl.loss_sum - want_ppl.loss_sum) / np.maximum(1.0, want_ppl.loss_sum))
      )
      assert ppl_err < 1e-5, ppl_err
      record(
        f"{name}/{mesh_name}",
        True,
        f"{len(split)}/{len(leaves)} params split; max relative loglik error {err:.1e}, "
        f"perplexity {got_ppl.perplexity:.3f} vs {want_ppl.perplexity:.3f}",
      )

    check(f"{name}/{mesh_name}", run)


def check_flag():
  def run():
    assert eval_sharding_from_flag("none") is None
    auto = eval_sharding_from_flag("auto")
    assert auto is not None and dict(auto.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(eval_sharding_from_flag("2,-1,2").mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad, message in (
      ("2,2", "must be 3 comma-separated ints"),
      ("3,1,1", "needs 3 devices but there are 8"),
      ("a,b,c", "must be 3 comma-separated ints"),
    ):
      try:
        eval_sharding_from_flag(bad)
      except ValueError as error:
        assert message in str(error), (bad, str(error))
      else:
        raise AssertionError(f"{bad!r} was accepted")
    # The models have 2 heads: a 4-way tensor axis cannot split them.
    model = build_model(CONFIGS["vanilla"])
    try:
      LoglikelihoodScorer(
        model, init_params(model, jax.random.key(0)), sharding=eval_sharding_from_flag("1,2,4")
      )
    except ValueError as error:
      assert "cannot be split 4 ways over the mesh axes ('tensor',)" in str(error), str(error)
    else:
      raise AssertionError("a tensor axis that does not divide the heads was accepted")
    record("flag", True, "auto = 8x1x1; errors name the bad value")

  check("flag", run)


def main() -> int:
  if len(jax.devices()) < 8:
    record("devices", False, f"need 8 devices, have {len(jax.devices())}")
    return 1
  for name, config in CONFIGS.items():
    check_model(name, config)
  check_flag()
  return summary()


if __name__ == "__main__":
  sys.exit(main())
