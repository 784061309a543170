"""Which Pallas kernels a function runs, read from its jaxpr (no monkeypatching).

With attention impl "pallas_interpret" the kernels stay `pallas_call`
equations in the traced program (the interpreter runs them when it is
lowered), so a test can see which kernel ran and with which operands.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

import jax


def _jaxprs(value: Any) -> Iterator[Any]:
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _jaxprs(item)


def _walk(jaxpr) -> Iterator[Any]:
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in _jaxprs(param):
        yield from _walk(sub)


def kernel_calls(fn, *args, **kwargs) -> List[Tuple[str, Tuple[Tuple[int, ...], ...]]]:
  """(kernel name, operand shapes) of every pallas_call that fn(*args) traces."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  calls = []
  for eqn in _walk(closed.jaxpr):
    if eqn.primitive.name == "pallas_call":
      calls.append((str(eqn.params.get("name")), tuple(tuple(v.aval.shape) for v in eqn.invars)))
  return calls
