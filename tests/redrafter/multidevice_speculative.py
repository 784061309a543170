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

from bt_jax.inference import SamplingConfig
from bt_jax.mesh import make_mesh
from bt_jax.models import build_model, init_params
from bt_jax.redrafter import (
  DraftHead,
  DrafterConfig,
  distillation_batches,
  drafter_generate_fn,
  speculative_generate,
  train_drafter,
)
from tests.multidevice import check, record, summary
from tests.utils import tiny_config

BASE = tiny_config(
  "vanilla", num_layers=2, width=32, head_dim=16, vocab_size=128, max_len=128, init_std=0.3
)
# Six ragged prompts: padded to 8 rows (one per device) with copies of the first.
PROMPTS = [
  [5, 6, 7, 8, 9, 10, 11],
  [3],
  [1, 2, 3, 4, 5],
  [20, 21, 22, 23, 24, 25, 26, 27],
  [9, 9, 1],
  [40, 41, 42, 43, 44, 45],
]
MAX_NEW = 16


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  model = build_model(BASE)
  params = init_params(model, jax.random.key(0))
  drafter = DraftHead(DrafterConfig.for_base(BASE, draft_len=3))
  batches = distillation_batches(model, params, PROMPTS * 4, continuation_len=20, batch_size=8)
  dparams, _ = train_drafter(
    model, params, drafter, batches, steps=60, learning_rate=3e-3, progress=False
  )
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  meshes = {
    "data8": mesh,
    # The KV cache split over 8 devices (Tree Attention), and 2 row groups
    # x 4 cache shards.
    "sequence8": jax.make_mesh((8,), ("sequence",), axis_types=(AxisType.Auto,)),
    "data2xsequence4": jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2),
    # The base model split by the training rules (heads / MLP / vocab over
    # tensor, embed over fsdp), rows over data x fsdp.
    "model2x2x2": make_mesh((2, 2, 2)),
  }
  settings = {
    "greedy-4beams": (SamplingConfig(), 4),
    "sampled-2drafts": (SamplingConfig(temperature=1.0), 2),
  }
  cases = [(m, s) for m in meshes for s in settings]
  for mesh_name, setting in cases:
    name = f"{mesh_name} {setting}"
    sampling, beams = settings[setting]

    def same_as_one_device(name=name, sampling=sampling, beams=beams, mesh=meshes[mesh_name]):
      kwargs = dict(
        max_new_tokens=MAX_NEW, beam_width=beams, sampling=sampling, seed=3, eos_id=None
      )
      # One device, on the batch the mesh run pads to (the padded rows also
      # decide how many steps the loop takes), cut to the real rows.
      groups = dict(mesh.shape).get("data", 1) * dict(mesh.shape).get("fsdp", 1)
      padded = PROMPTS + [PROMPTS[0]] * (-len(PROMPTS) % groups)
      want = speculative_generate(model, params, drafter, dparams, padded, **kwargs)
      got = speculative_generate(model, params, drafter, dparams, PROMPTS, mesh=mesh, **kwargs)
      for field in ("tokens", "lengths", "row_steps", "accepted"):
        np.testing.assert_array_equal(
          np.asarray(getattr(got, field)),
          np.asarray(getattr(want, field))[: len(PROMPTS)],
          err_msg=field,
        )
      assert np.asarray(got.tokens).shape == (len(PROMPTS), MAX_NEW)
      assert int(got.steps) == int(want.steps)
      accepted = np.asarray(want.accepted)
      record(
        f"{name}: same as one device",
        True,
        f"accepted per row {accepted.tolist()}, steps {int(want.steps)}",
      )

    check(f"{name}: same as one device", same_as_one_device)

  def split_memory(name, mesh, long_prompt):
    # The compiled loop's per-device temporaries: 1 row of 8, so far less
    # than one device's.
    tokens = np.ones((8, long_prompt), np.int32)
    pad = np.zeros((8,), np.int32)
    args = (params, dparams, tokens, pad, np.int32(-1), jax.random.key(0))
    one = drafter_generate_fn(model, drafter, 4, MAX_NEW).lower(*args).compile()
    from bt_jax.redrafter.speculative import _in_shardings  # pylint: disable=import-outside-toplevel

    placed = jax.device_put(args, _in_shardings(model, mesh))
    split = drafter_generate_fn(model, drafter, 4, MAX_NEW, mesh=mesh).lower(*placed).compile()
    one_temp = one.memory_analysis().temp_size_in_bytes
    split_temp = split.memory_analysis().temp_size_in_bytes
    split(*placed)
    assert split_temp < one_temp / 2, (split_temp, one_temp)
    record(name, True, f"temp bytes per device {split_temp} vs {one_temp} on one device")

  check(
    "rows split over the data axis", lambda: split_memory("rows split over the data axis", mesh, 8)
  )

  def cache_is_split():
    # The compiled loop carries each device's eighth of the cache (round-robin
    # slots), never the whole cache: prompt 96 + 16 new + 4 (g0 and 3 drafts)
    # + 16 packed slots = 132, padded to 136 = 8 x 17 slots.
    seq_mesh = meshes["sequence8"]
    args = (
      params,
      dparams,
      np.ones((8, 96), np.int32),
      np.zeros((8,), np.int32),
      np.int32(-1),
      jax.random.key(0),
    )
    from bt_jax.redrafter.speculative import _in_shardings  # pylint: disable=import-outside-toplevel

    placed = jax.device_put(args, _in_shardings(model, seq_mesh))
    text = (
      drafter_generate_fn(model, drafter, 4, MAX_NEW, mesh=seq_mesh)
      .lower(*placed)
      .compile()
      .as_text()
    )
    heads, head_dim = BASE.stack.num_heads, BASE.stack.resolved_head_dim
    local, whole = f"f32[8,17,{heads},{head_dim}]", f"f32[8,136,{heads},{head_dim}]"
    assert local in text and whole not in text, (local in text, whole in text)
    record("cache split over the sequence axis", True, f"{local} per device, no {whole}")

  check("cache split over the sequence axis", cache_is_split)

  def params_are_split():
    from bt_jax.redrafter.speculative import _in_shardings  # pylint: disable=import-outside-toplevel

    shardings = _in_shardings(model, meshes["model2x2x2"])[0]
    kernel = shardings["lm_head"]["kernel"].spec
    assert "tensor" in jax.tree.leaves(tuple(kernel)), kernel
    wide = make_mesh((1, 1, 8))  # 2 heads cannot be split 8 ways
    try:
      speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4, mesh=wide)
    except ValueError as e:
      assert "cannot be split 8 ways" in str(e), e
    else:
      raise AssertionError("a tensor axis that does not divide the heads was accepted")
    record("params split by the training rules", True, f"lm_head kernel {kernel}")

  check("params split by the training rules", params_are_split)

  def errors():
    bad = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    try:
      speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4, mesh=bad)
    except ValueError as e:
      assert "shards only the rows" in str(e) and "'tensor': 4" in str(e), e
    else:
      raise AssertionError("a mesh splitting the model was accepted")
    no_axes = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    try:
      speculative_generate(model, params, drafter, dparams, PROMPTS, max_new_tokens=4, mesh=no_axes)
    except ValueError as e:
      assert "splits rows over a `data` mesh axis" in str(e), e
    else:
      raise AssertionError("a mesh without a data or sequence axis was accepted")
    record("mesh errors name the axes", True)

  check("mesh errors name the axes", errors)
  return summary()


if __name__ == "__main__":
  sys.exit(main())
