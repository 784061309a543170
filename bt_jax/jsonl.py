"""JSON-lines files: one JSON value per non-empty line."""

from __future__ import annotations

import json
from typing import Any


def read_jsonl(path: str, *, line_numbers: bool = False) -> list[Any]:
  """The records of a JSON-lines file; a bad line is a ValueError naming it.

  line_numbers: return (line number, record) pairs, for error messages.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
      records.append((line_number, record) if line_numbers else record)
  return records
