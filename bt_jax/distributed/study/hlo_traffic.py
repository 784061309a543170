"""Bytes each device sends in collectives, read from compiled HLO text.

`collective_traffic(compiled.as_text())` finds every all-reduce,
collective-permute, all-gather, reduce-scatter and all-to-all (and their async
`-start` forms; `-done` is not counted twice) and sums the sizes of their
operands, which in SPMD-partitioned HLO are per-device shapes. Operand sizes
are what each device contributes: a collective-permute sends exactly that; an
all-reduce library moves about 2 (p - 1) / p times it over the wire with a ring
algorithm. Collectives inside a while loop are counted once (the sharded
decode attentions here unroll their loops, so none are).
"""

from __future__ import annotations

import re
from typing import Dict, List

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
COLLECTIVE_OPS = ("all-reduce", "collective-permute", "all-gather", "reduce-scatter", "all-to-all")
_ARRAY_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
  r"(?P<op>[a-z][a-z0-9\-]*)\((?P<args>[^)]*)\)"
)


def _shape_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY_SHAPE.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    total += count * _DTYPE_BYTES[dtype]
  return total


def parse_collectives(hlo_text: str) -> List[Dict]:
  """One dict per collective: op, name, operand_bytes."""
  shapes: Dict[str, str] = {}
  candidates = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shapes[match["name"]] = match["shape"]
    op = match["op"]
    base = op[: -len("-start")] if op.endswith("-start") else op
    if base in COLLECTIVE_OPS:
      candidates.append((base, match["name"], match["shape"], match["args"]))
  collectives = []
  for op, name, result_shape, args in candidates:
    operand_bytes = 0
    for arg in filter(None, (a.strip() for a in args.split(","))):
      # An operand is printed as "%name" or "f32[4]{0} %name".
      arg_shape = arg if "[" in arg else shapes.get(arg.split()[-1].lstrip("%"))
      if arg_shape is not None:
        operand_bytes += _shape_bytes(arg_shape)
    if operand_bytes == 0 and op in ("all-reduce", "collective-permute"):
      operand_bytes = _shape_bytes(result_shape)  # same shape as the operand
    collectives.append(dict(op=op, name=name, operand_bytes=operand_bytes))
  return collectives


def collective_traffic(hlo_text: str) -> Dict:
  """Totals: bytes (all collectives), count, and per-op bytes and counts."""
  collectives = parse_collectives(hlo_text)
  by_op = {}
  for c in collectives:
    entry = by_op.setdefault(c["op"], dict(bytes=0, count=0))
    entry["bytes"] += c["operand_bytes"]
    entry["count"] += 1
  return dict(
    bytes=sum(c["operand_bytes"] for c in collectives), count=len(collectives), by_op=by_op
  )


def formula_traffic(
  method: str,
  *,
  num_devices: int,
  batch: int,
  q_len: int,
  heads: int,
  kv_heads: int,
  head_dim: int,
  kv_len: int,
  kv_itemsize: int,
) -> Dict:
  """Bytes each device contributes to collectives, and steps, from formulas.

  Partials travel as float32: o is head_dim numbers and lse one number per
  (batch, head, query); the all-reduce merge also reduces the max (one more).
  """
  stats = batch * heads * q_len
  partial_bytes = 4 * stats * (head_dim + 1)  # (o, lse)
  allreduce_bytes = 4 * stats * (head_dim + 2)  # max, then (n, d)
  shard_len = kv_len // num_devices
  kv_step_bytes = 2 * batch * shard_len * kv_heads * head_dim * kv_itemsize + 4 * batch
  log_steps = max(num_devices - 1, 0).bit_length()  # ceil(log2 p)
  if num_devices == 1:
    return dict(bytes=0, steps=0)
  if method == "tree":
    return dict(bytes=allreduce_bytes, steps=log_steps)
  if method == "tree_two_level":
    return dict(bytes=2 * allreduce_bytes, steps=log_steps)
  if method == "tree_butterfly":
    return dict(bytes=log_steps * partial_bytes, steps=log_steps)
  if method == "ring_kv":
    return dict(bytes=(num_devices - 1) * kv_step_bytes, steps=num_devices - 1)
  if method == "ring_partials":
    return dict(bytes=(num_devices - 1) * partial_bytes, steps=num_devices - 1)
  raise ValueError(f"no traffic formula for method {method!r}")
