"""experiments.kernel_bench end to end on tiny shapes (interpret mode on CPU).

Checks the benchmark's plumbing before a GPU run depends on it: every impl is
timed or skipped with a reason, the kernels' errors against the reference are
recorded and small, tile variants are run, decode bandwidth is the bytes the
call must read over the time, and the JSON carries what the table printed.
"""

from __future__ import annotations

import json

import pytest

from bt_jax import cli
from experiments import kernel_bench
from experiments.kernel_bench import DecodeShape, FlashShape


def test_kernel_bench_tiny_preset(monkeypatch, tmp_path, capsys):
  tiny = dict(
    dtype="float32",
    warmup=0,
    repeats=1,
    flash=[
      FlashShape(1, 40, 2, 1, 16, True, tiles=((16, 16, 16, 32),)),
      FlashShape(1, 32, 2, 2, 16, False, local_block=8),
    ],
    decode=[DecodeShape(2, 2, 100, 4, 2, 16)],
  )
  monkeypatch.setitem(kernel_bench.PRESETS, "cpu", tiny)
  out = tmp_path / "new_folder" / "bench.json"  # --out's folder is created
  records = cli.call(kernel_bench, ["--preset", "cpu", "--out", str(out), "--peak_bw_gbs", "100"])
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report["results"] == json.loads(json.dumps(records))
  assert report["meta"]["kernel_impl"] == "interpret" and report["meta"]["peak_bw_gbs"] == 100
  assert report["meta"]["complete"]

  timed = [r for r in records if "skipped" not in r]
  skipped = [r for r in records if "skipped" in r]
  assert all(r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] for r in timed)
  # On CPU only cuDNN (and jax.nn on block-local shapes) may be skipped.
  assert {r["impl"] for r in skipped} <= {"jax_nn_cudnn", "jax_nn_xla"}, skipped
  assert all(r["skipped"].startswith("skipped:") for r in skipped), skipped

  flash = [r for r in timed if r["kernel"] == "flash"]
  impls = {(r["impl"], r["mode"], r["seq_len"]) for r in flash}
  for mode in ("fwd", "fwd_bwd"):
    assert {
      ("pallas", mode, 40),
      ("xla_ref", mode, 40),
      ("jax_nn_xla", mode, 40),
      ("pallas[16,16,16,32]", mode, 40),
      ("pallas", mode, 32),
    } <= impls
  for r in flash:
    if r["impl"] == "pallas":
      keys = ("fwd_out", "fwd_lse") if r["mode"] == "fwd" else ("dq", "dk", "dv")
      for key in keys:
        assert r[f"max_err_{key}"] < 1e-4, (r, key)

  decode = [r for r in timed if r["kernel"] == "decode"]
  assert {r["impl"] for r in decode} == {"pallas", "xla_ref", "jax_nn_xla"}
  for r in decode:
    # K and V of every row over the whole cache (no lengths given: full).
    assert r["kv_bytes"] == 2 * 2 * 100 * 2 * 16 * 4, r
    assert abs(r["gbs"] - r["kv_bytes"] / (r["median_ms"] * 1e-3) / 1e9) < 1e-6 * r["gbs"]
    assert abs(r["frac_peak_bw"] - r["gbs"] / 100) < 1e-9, r
  pallas = next(r for r in decode if r["impl"] == "pallas")
  assert pallas["max_err_out"] < 1e-5 and pallas["max_err_lse"] < 1e-5
  assert "pallas[16,16,16,32]" in printed and "decode" in printed


def test_kernel_bench_keeps_what_was_measured(monkeypatch, tmp_path):
  """A crash in the decode shapes leaves the flash records in the JSON."""
  tiny = dict(
    dtype="float32",
    warmup=0,
    repeats=1,
    flash=[FlashShape(1, 32, 2, 2, 16, True)],
    decode=[DecodeShape(1, 1, 64, 2, 2, 16)],
  )
  monkeypatch.setitem(kernel_bench.PRESETS, "cpu", tiny)

  def crash(*args, **kwargs):
    raise RuntimeError("device lost")

  monkeypatch.setattr(kernel_bench, "bench_decode", crash)
  out = tmp_path / "bench.json"
  with pytest.raises(RuntimeError, match="device lost"):
    cli.call(kernel_bench, ["--preset", "cpu", "--out", str(out), "--nocheck"])
  report = json.loads(out.read_text())
  assert not report["meta"]["complete"]
  assert report["results"] and {r["kernel"] for r in report["results"]} == {"flash"}
