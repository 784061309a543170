"""Data-parallel speculative decoding on forced CPU devices, against one device.

Run in its own process by test_redrafter.py (never import it from pytest):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/redrafter/multidevice_speculative.py
Prints one JSON line per check ({"name", "ok", "detail"}), then a summary
line, and exits 1 if any check failed.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.sharding import AxisType

from bt_jax.config import VanillaConfig
from bt_jax.inference import SamplingConfig
from bt_jax.models import build_model, init_params
from bt_jax.redrafter import (DraftHead, DrafterConfig, distillation_batches,
                              drafter_generate_fn, speculative_generate, train_drafter)
from tests.multidevice import check, record, summary

BASE = VanillaConfig(num_layers=2, width=32, head_dim=16, vocab_size=128, max_len=128,
                     init_std=0.3)
# Six ragged prompts: padded to 8 rows (one per device) with copies of the first.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [1, 2, 3, 4, 5], [20, 21, 22, 23, 24, 25, 26, 27],
           [9, 9, 1], [40, 41, 42, 43, 44, 45]]
MAX_NEW = 16


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  model = build_model(BASE)
  params = init_params(model, jax.random.key(0))
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=3))
  batches = distillation_batches(model, params, PROMPTS * 4, continuation_len=20, batch_size=8)
  dparams, _ = train_drafter(model, params, drafter, batches, steps=60, learning_rate=3e-3,
                             progress=False)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  settings = {"greedy-4beams": (SamplingConfig(), 4),
              "sampled-2drafts": (SamplingConfig(temperature=1.0), 2)}
  for name, (sampling, beams) in settings.items():
    def same_as_one_device(name=name, sampling=sampling, beams=beams):
      kwargs = dict(max_new_tokens=MAX_NEW, beam_width=beams, sampling=sampling, seed=3,
                    eos_id=None)
      # One device, on the batch the mesh run pads to (the padded rows also
      # decide how many steps the loop takes), cut to the real rows.
      padded = PROMPTS + [PROMPTS[0]] * 2
      want = speculative_generate(model, params, drafter, dparams, padded, **kwargs)
      got = speculative_generate(model, params, drafter, dparams, PROMPTS, mesh=mesh, **kwargs)
      for field in ("tokens", "lengths", "row_steps", "accepted"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                      np.asarray(getattr(want, field))[:len(PROMPTS)],
                                      err_msg=field)
      assert np.asarray(got.tokens).shape == (len(PROMPTS), MAX_NEW)
      assert int(got.steps) == int(want.steps)
      accepted = np.asarray(want.accepted)
      record(f"{name}: same as one device", True,
             f"accepted per row {accepted.tolist()}, steps {int(want.steps)}")
    check(f"{name}: same as one device", same_as_one_device)

  def rows_are_split():
    # The compiled loop's per-device buffers: the caches and state of 1 row
    # of 8, so far less temporary memory than the one-device loop's.
    tokens = np.zeros((8, 8), np.int32)
    pad = np.zeros((8,), np.int32)
    args = (params, dparams, tokens, pad, np.int32(-1), jax.random.key(0))
    one = drafter_generate_fn(model, drafter, 4, MAX_NEW).lower(*args).compile()
    from bt_jax.redrafter.speculative import _in_shardings  # pylint: disable=import-outside-toplevel
    placed = jax.device_put(args, _in_shardings(mesh))
    split = drafter_generate_fn(model, drafter, 4, MAX_NEW, mesh=mesh).lower(*placed).compile()
    one_temp = one.memory_analysis().temp_size_in_bytes
    split_temp = split.memory_analysis().temp_size_in_bytes
    out = split(*placed)
    assert out.tokens.sharding.spec[0] == "data", out.tokens.sharding
    assert split_temp < one_temp / 2, (split_temp, one_temp)
    record("rows split over the data axis", True,
           f"temp bytes per device {split_temp} vs {one_temp} on one device")
  check("rows split over the data axis", rows_are_split)

  def errors():
    bad = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)
    try:
      speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4, mesh=bad)
    except ValueError as e:
      assert "shards only the rows" in str(e) and "'sequence': 4" in str(e), e
    else:
      raise AssertionError("a mesh splitting the sequence was accepted")
    no_data = jax.make_mesh((8,), ("sequence",), axis_types=(AxisType.Auto,))
    try:
      speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4,
                           mesh=no_data)
    except ValueError as e:
      assert "splits rows over a `data` mesh axis" in str(e), e
    else:
      raise AssertionError("a mesh without a data axis was accepted")
    record("mesh errors name the axes", True)
  check("mesh errors name the axes", errors)
  return summary()


if __name__ == "__main__":
  sys.exit(main())
