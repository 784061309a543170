"""`experiments.op_profile`: time per op from jax.profiler and torch.profiler traces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from experiments import op_profile


def test_source_op_drops_scopes_and_folds_layers():
  name = "jit(_generate)/while/body/VanillaLM.decode/decoder/layer_11/mlp/wi/dot_general"
  assert op_profile.source_op(name) == "VanillaLM.decode/decoder/layer_N/mlp/wi/dot_general"
  assert op_profile.source_op("jit(f)/add") == "add"


def test_jax_profile_puts_the_big_matmul_first():
  """A 1024 x 1024 x 1024 matmul (2 GFLOP) beside an elementwise add of 1024
  numbers: the trace, read back through the compiled HLO's metadata, must
  attribute most of the time to the dot, and the shares must add up."""

  @jax.jit
  def f(a, b, c):
    return jnp.dot(a, b) + 1.0, c * 2.0

  a = jnp.ones((1024, 1024))
  c = jnp.ones((1024,))
  jax.block_until_ready(f(a, a, c))
  rows = op_profile.jax_op_profile(f, a, a, c, top=None)
  assert sum(r["share"] for r in rows) == pytest.approx(1.0)
  assert rows == sorted(rows, key=lambda r: -r["ms"])
  assert "dot_general" in rows[0]["op"] and rows[0]["share"] > 0.5, rows
  text = op_profile.format_profile("f", rows)
  assert rows[0]["op"] in text.splitlines()[2]


def test_torch_profile_puts_the_big_matmul_first():
  torch = pytest.importorskip("torch")
  a = torch.ones(768, 768)
  c = torch.ones(16)
  rows = op_profile.torch_op_profile(lambda: (a @ a @ a, c + 1))
  assert sum(r["share"] for r in rows) == pytest.approx(1.0)
  assert rows[0]["op"] == "aten::mm" and rows[0]["calls"] == 2 and rows[0]["share"] > 0.5, rows
