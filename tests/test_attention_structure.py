"""Where kernel choices live (docs/inference.md, "Attention paths").

`bt_jax/attention.py` is the only module of bt_jax that imports
`pallas_kernels`; `bt_jax/layers.py` imports neither `pallas_kernels` nor
`bt_jax.distributed`; impl "pallas" without a GPU/TPU says once that it runs
the XLA reference.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_modules(path: pathlib.Path) -> set:
  """Every module an import statement of the file names (also inside functions)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _imports(path: pathlib.Path, package: str) -> bool:
  return any(name == package or name.startswith(package + ".") for name in _imported_modules(path))


def test_layers_imports_neither_kernels_nor_distributed():
  layers = ROOT / "bt_jax" / "layers.py"
  assert not _imports(layers, "pallas_kernels")
  assert not _imports(layers, "bt_jax.distributed")
  assert _imports(layers, "bt_jax.attention")


def test_only_attention_imports_pallas_kernels():
  importers = sorted(
    str(path.relative_to(ROOT))
    for path in (ROOT / "bt_jax").rglob("*.py")
    if _imports(path, "pallas_kernels")
  )
  assert importers == ["bt_jax/attention.py"], importers


@pytest.mark.slow
def test_pallas_on_cpu_warns_once_and_runs_the_reference():
  """Two "pallas" calls (flash and decode) in a fresh process: one warning,
  and the results of the jnp reference."""
  script = textwrap.dedent("""
      import warnings
      import jax, jax.numpy as jnp, numpy as np
      from bt_jax import attention
      assert jax.default_backend() == "cpu"
      q = jax.random.normal(jax.random.key(0), (2, 4, 2, 16))
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flash = attention.dot_product_attention(q, q, q, causal=True, impl="pallas")
        out, _ = attention.decode_attention(q[:, :1], q, q, jnp.array([4, 2]), impl="pallas")
        again = attention.dot_product_attention(q, q, q, causal=True, impl="pallas")
      fallbacks = [w for w in caught
                   if issubclass(w.category, attention.KernelFallbackWarning)]
      assert len(fallbacks) == 1, [str(w.message) for w in caught]
      assert "XLA" in str(fallbacks[0].message) and "pallas_interpret" in str(fallbacks[0].message)
      want = attention.dot_product_attention(q, q, q, causal=True, impl="xla")
      np.testing.assert_array_equal(np.asarray(flash), np.asarray(want))
      np.testing.assert_array_equal(np.asarray(again), np.asarray(want))
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attention.dot_product_attention(q, q, q, causal=True, impl="xla")
        attention.decode_attention(q[:, :1], q, q, jnp.array([4, 2]), impl="pallas_interpret")
      assert not [w for w in caught if issubclass(w.category, attention.KernelFallbackWarning)]
      print("OK")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
  )
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
