"""JSON-lines files (.gz allowed): one JSON value per non-empty line."""

from __future__ import annotations

import gzip
import json
from typing import Any, BinaryIO

from bt_jax.cli import UserError


def open_binary(path: str) -> BinaryIO:
  """The file's bytes, gunzipped when its name ends in .gz."""
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def decode_utf8(data: bytes, where: str) -> str:
  """UTF-8 text, or a UserError naming `where` and the first bad byte."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(
      f"{where} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); "
      "convert it to UTF-8"
    ) from e


def read_jsonl(path: str, *, line_numbers: bool = False) -> list[Any]:
  """The records of a JSON-lines file; a bad line (not UTF-8, not JSON) is a
  UserError naming the file and the line.

  line_numbers: return (line number, record) pairs, for error messages.
  """
  records = []
  with open_binary(path) as f:
    for line_number, raw in enumerate(f, 1):
      line = decode_utf8(raw, f"{path}:{line_number}")
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_number} is not valid JSON: {e}") from e
      records.append((line_number, record) if line_numbers else record)
  return records
