"""The import direction of docs/architecture.md: a lower layer never imports a higher one."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# module (or package) -> the project modules it may import (prefixes).
ALLOWED = {
  "pallas_kernels": (),
  "bt_jax.config": (),
  "bt_jax.axes": (),
  "bt_jax.cli": (),
  "bt_jax.jsonl": ("bt_jax.cli",),
  "bt_jax.attention": ("bt_jax.config", "bt_jax.distributed.merge", "pallas_kernels"),
  "bt_jax.layers": ("bt_jax.config", "bt_jax.axes", "bt_jax.attention"),
  "bt_jax.models": ("bt_jax.config", "bt_jax.axes", "bt_jax.layers", "bt_jax.models"),
  "bt_jax.data": ("bt_jax.cli", "bt_jax.jsonl", "bt_jax.data"),
}
BINARIES = (
  "bt_jax.train",
  "bt_jax.generate",
  "bt_jax.eval_zero_shot",
  "bt_jax.eval_perplexity",
  "bt_jax.train_drafter",
  "bt_jax.convert.__main__",
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Project modules imported anywhere in the file (function-level imports too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return {n for n in names if n.split(".")[0] in ("bt_jax", "pallas_kernels")}


def _files():
  return sorted(list(ROOT.glob("bt_jax/**/*.py")) + list(ROOT.glob("pallas_kernels/**/*.py")))


def _is_module(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def _violations(layer, imports_of=_imports):
  allowed = ALLOWED[layer] + (layer,)  # a layer may import its own modules
  bad = []
  for path in _files():
    module = _module_name(path)
    if not _is_module(module, layer):
      continue
    for name in imports_of(path):
      if name == "bt_jax":  # `from bt_jax import x`: judged by its x
        continue
      if not any(_is_module(name, a) for a in allowed):
        bad.append(f"{module} imports {name}")
  return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_low_layers_import_only_what_they_may(layer):
  bad = _violations(layer)
  assert not bad, f"{layer} may import only {ALLOWED[layer]} (docs/architecture.md): {bad}"


def test_no_library_module_imports_a_binary():
  bad = []
  for path in _files():
    module = _module_name(path)
    if any(_is_module(module, b) for b in BINARIES):
      continue
    for name in _imports(path):
      if any(_is_module(name, b) or name == b for b in BINARIES):
        bad.append(f"{module} imports {name}")
  assert not bad, bad


def test_the_check_can_fail():
  """layers importing distributed, or the kernels importing bt_jax, is caught."""

  def with_extra(extra):
    return lambda path: _imports(path) | {extra}

  assert _violations("bt_jax.layers", with_extra("bt_jax.distributed.sharded_cache"))
  assert _violations("pallas_kernels", with_extra("bt_jax.models"))


# torch and transformers are test and benchmark dependencies (requirements-test.txt):
# the library never imports transformers, and torch only inside the one function
# that reads a pytorch_model.bin when the user has torch (docs/convert.md).
PEER_PACKAGES = ("torch", "transformers")


def _peer_imports(source: str) -> list[tuple[str, bool]]:
  """(imported torch / transformers module, whether at module level) of a file."""
  tree = ast.parse(source)
  nested = {
    id(n)
    for f in ast.walk(tree)
    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
    for n in ast.walk(f)
    if n is not f
  }
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module]
    else:
      continue
    found += [(n, id(node) not in nested) for n in names if n.split(".")[0] in PEER_PACKAGES]
  return found


def _peer_violations(source: str) -> list[str]:
  return [
    f"{name} ({'module level' if top else 'in a function'})"
    for name, top in _peer_imports(source)
    if name.split(".")[0] == "transformers" or top
  ]


def test_library_never_imports_torch_or_transformers():
  bad = {
    _module_name(p): v for p in _files() if (v := _peer_violations(p.read_text(encoding="utf-8")))
  }
  assert not bad, f"bt_jax must not import torch or transformers (requirements-test.txt): {bad}"


def test_the_peer_import_check_can_fail():
  assert _peer_violations("import torch\n") == ["torch (module level)"]
  assert _peer_violations("def f():\n  from transformers import AutoModel\n") == [
    "transformers (in a function)"
  ]
  assert _peer_violations("def f():\n  import torch\n") == []
