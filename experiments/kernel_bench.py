"""Times the Pallas attention kernels against XLA and cuDNN attention.

    python -m experiments.kernel_bench [--preset cpu|gpu] [--out results.json]
        [--peak_bw_gbs 3350] [--only flash|decode] [--repeats N] [--nocheck]

For each shape of the preset's grid it times, with warm-up and repeats (each
call ended by block_until_ready; the median is reported):
  * flash forward and forward+backward: the Pallas kernel
    (`pallas_kernels.flash_attention`), our pure-jnp reference ("xla_ref"),
    `jax.nn.dot_product_attention(implementation="xla")` ("jax_nn_xla") and
    `implementation="cudnn"` ("jax_nn_cudnn", GPU only; skipped with the reason
    recorded where unavailable);
  * decode (`pallas_kernels.decode_attention`) against the same baselines,
    reporting the achieved bandwidth = bytes of K/V the call must read
    (2 * sum(lengths) * kv_heads * head_dim * itemsize) / time and, with
    --peak_bw_gbs, the fraction of peak.
It also checks the kernel against the reference on every shape (max abs error
of out / lse / grads; --nocheck skips this), prints a table and writes JSON
(rewritten after every shape, so a crash keeps what was measured).

On CPU the kernels run in Pallas interpret mode (impl="interpret"), so CPU
numbers measure the interpreter, not the kernel design; the gpu preset is the
one that means something (H100: peak HBM bandwidth ~3350 GB/s for SXM).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import flags

from bt_jax import cli
from experiments.timing import time_call
from pallas_kernels import (
  decode_attention,
  flash_attention,
  reference_attention,
  reference_decode_attention,
)


@dataclasses.dataclass(frozen=True)
class FlashShape:
  batch: int
  seq_len: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  local_block: Optional[int] = None
  # Extra Pallas runs with these (block_q, block_k, block_q_dkv, block_k_dkv)
  # tiles, to compare against the defaults on the device.
  tiles: Tuple[Tuple[int, int, int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int


_GPU_TILE_VARIANTS = ((64, 64, 64, 64), (128, 128, 64, 64), (128, 32, 32, 64))

PRESETS: Dict[str, Dict[str, Any]] = {
  # Interpret mode on a shared 2-core CPU: small, and few repeats.
  "cpu": dict(
    dtype="float32",
    warmup=1,
    repeats=3,
    flash=[FlashShape(1, 256, 4, 2, 64, True), FlashShape(1, 256, 4, 4, 64, False)],
    decode=[DecodeShape(2, 1, 2048, 8, 2, 64)],
  ),
  "gpu": dict(
    dtype="bfloat16",
    warmup=3,
    repeats=20,
    flash=[
      FlashShape(
        max(1, 16384 // t), t, 16, 16, 64, causal, tiles=_GPU_TILE_VARIANTS if t == 2048 else ()
      )
      for t in (512, 1024, 2048, 4096)
      for causal in (True, False)
    ]
    + [
      FlashShape(8, 2048, 16, 4, 64, True),  # GQA
      FlashShape(8, 2048, 8, 8, 128, True),  # head_dim 128
      FlashShape(8, 2048, 16, 16, 64, True, 128),
    ],  # block-local
    decode=[
      DecodeShape(b, q, t, 32, 8, 128) for b in (1, 8) for t in (4096, 32768) for q in (1, 4)
    ],
  ),
}


def _kernel_impl() -> str:
  return "pallas" if jax.default_backend() in ("gpu", "tpu") else "interpret"


def _flash_impls(shape: FlashShape) -> Dict[str, Optional[Callable]]:
  """name -> attention(q, k, v) -> out, or a string saying why skipped."""
  kernel_impl = _kernel_impl()
  impls: Dict[str, Any] = {
    "pallas": lambda q, k, v: flash_attention(
      q, k, v, causal=shape.causal, local_block=shape.local_block, impl=kernel_impl
    ),
    "xla_ref": lambda q, k, v: flash_attention(
      q, k, v, causal=shape.causal, local_block=shape.local_block, impl="xla"
    ),
  }
  for tiles in shape.tiles:
    bq, bk, bq_dkv, bk_dkv = tiles
    impls["pallas" + str(list(tiles)).replace(" ", "")] = (
      lambda q, k, v, bq=bq, bk=bk, bq_dkv=bq_dkv, bk_dkv=bk_dkv: flash_attention(
        q,
        k,
        v,
        causal=shape.causal,
        local_block=shape.local_block,
        impl=kernel_impl,
        block_q=bq,
        block_k=bk,
        block_q_dkv=bq_dkv,
        block_k_dkv=bk_dkv,
      )
    )
  if shape.local_block is not None:
    # jax.nn's local window is a sliding window, not block-local attention.
    impls["jax_nn_xla"] = "skipped: no block-local mask in jax.nn"
    impls["jax_nn_cudnn"] = "skipped: no block-local mask in jax.nn"
    return impls
  impls["jax_nn_xla"] = lambda q, k, v: jax.nn.dot_product_attention(
    q, k, v, is_causal=shape.causal, implementation="xla"
  )
  if jax.default_backend() == "gpu":
    impls["jax_nn_cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=shape.causal, implementation="cudnn"
    )
  else:
    impls["jax_nn_cudnn"] = "skipped: cuDNN needs a GPU backend"
  return impls


def _flash_flops(shape: FlashShape) -> float:
  # Two matmuls of 2*t*t*d flops per head; causal does about half.
  flops = 4.0 * shape.batch * shape.heads * shape.seq_len**2 * shape.head_dim
  if shape.local_block is not None:
    flops *= min(1.0, shape.local_block / shape.seq_len)
  return flops / 2 if shape.causal else flops


def bench_flash(
  shape: FlashShape, dtype, warmup: int, repeats: int, check: bool
) -> List[Dict[str, Any]]:
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (shape.batch, shape.seq_len, shape.heads, shape.head_dim), dtype)
  k = jax.random.normal(
    keys[1], (shape.batch, shape.seq_len, shape.kv_heads, shape.head_dim), dtype
  )
  v = jax.random.normal(keys[2], k.shape, dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)
  records = []
  errors: Dict[str, float] = {}
  if check:
    errors = _check_flash(shape, q, k, v, d_out)
  fwd_flops = _flash_flops(shape)
  for name, attention in _flash_impls(shape).items():
    for mode in ("fwd", "fwd_bwd"):
      fields = dataclasses.asdict(shape)
      del fields["tiles"]
      record = dict(kernel="flash", mode=mode, impl=name, **fields, dtype=jnp.dtype(dtype).name)
      if isinstance(attention, str):
        record["skipped"] = attention
        records.append(record)
        continue
      if mode == "fwd":
        fn = jax.jit(attention)
        flops = fwd_flops
      else:
        # Backward recomputes scores: ~2.5x the forward's flops.
        fn = jax.jit(
          jax.grad(
            lambda q, k, v, g: jnp.vdot(
              attention(q, k, v).astype(jnp.float32), g.astype(jnp.float32)
            ),
            argnums=(0, 1, 2),
          )
        )
        flops = 3.5 * fwd_flops
      args = (q, k, v) if mode == "fwd" else (q, k, v, d_out)
      try:
        record.update(time_call(fn, args, warmup, repeats))
        record["tflops"] = flops / (record["median_ms"] * 1e-3) / 1e12
      except Exception as error:  # an unsupported baseline must not stop the sweep
        record["skipped"] = f"failed: {type(error).__name__}: {error}"[:300]
      if name == "pallas":
        wanted = ("fwd_out", "fwd_lse") if mode == "fwd" else ("dq", "dk", "dv")
        record.update({f"max_err_{key}": errors[key] for key in wanted if key in errors})
      records.append(record)
  return records


def _check_flash(shape: FlashShape, q, k, v, d_out) -> Dict[str, float]:
  """Max abs error of the kernel vs the f32 reference: out, lse, dq, dk, dv."""
  kernel_impl = _kernel_impl()
  kwargs = dict(causal=shape.causal, local_block=shape.local_block)

  def run(attention):
    def loss(q, k, v):
      out, lse = attention(q, k, v)
      return jnp.vdot(out.astype(jnp.float32), d_out.astype(jnp.float32)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v
    )
    return out, lse, grads

  got = run(functools.partial(flash_attention, impl=kernel_impl, return_lse=True, **kwargs))
  f32 = lambda x: x.astype(jnp.float32)
  want = run(lambda q, k, v: reference_attention(f32(q), f32(k), f32(v), **kwargs))

  def err(a, b):
    return float(jnp.max(jnp.abs(f32(a) - f32(b))))

  return {
    "fwd_out": err(got[0], want[0]),
    "fwd_lse": err(got[1], want[1]),
    "dq": err(got[2][0], want[2][0]),
    "dk": err(got[2][1], want[2][1]),
    "dv": err(got[2][2], want[2][2]),
  }


def bench_decode(
  shape: DecodeShape, dtype, warmup: int, repeats: int, check: bool, peak_bw_gbs: Optional[float]
) -> List[Dict[str, Any]]:
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (shape.batch, shape.q_len, shape.heads, shape.head_dim), dtype)
  cache_shape = (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim)
  k = jax.random.normal(keys[1], cache_shape, dtype)
  v = jax.random.normal(keys[2], cache_shape, dtype)
  lengths = jnp.full((shape.batch,), shape.kv_len, jnp.int32)
  bytes_read = 2 * int(lengths.sum()) * shape.kv_heads * shape.head_dim * jnp.dtype(dtype).itemsize
  kernel_impl = _kernel_impl()
  impls: Dict[str, Any] = {
    "pallas": lambda q, k, v, n: decode_attention(q, k, v, n, impl=kernel_impl),
    "xla_ref": lambda q, k, v, n: decode_attention(q, k, v, n, impl="xla"),
    "jax_nn_xla": lambda q, k, v, n: jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=n, implementation="xla"
    ),
  }
  if jax.default_backend() == "gpu":
    impls["jax_nn_cudnn"] = lambda q, k, v, n: jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=n, implementation="cudnn"
    )
  else:
    impls["jax_nn_cudnn"] = "skipped: cuDNN needs a GPU backend"
  errors = {}
  if check:
    out, lse = jax.jit(impls["pallas"])(q, k, v, lengths)
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_lse = jax.jit(reference_decode_attention)(f32(q), f32(k), f32(v), lengths)
    errors = {
      "max_err_out": float(jnp.max(jnp.abs(f32(out) - ref_out))),
      "max_err_lse": float(jnp.max(jnp.abs(lse - ref_lse))),
    }
  records = []
  for name, attention in impls.items():
    record = dict(
      kernel="decode",
      mode="fwd",
      impl=name,
      **dataclasses.asdict(shape),
      dtype=jnp.dtype(dtype).name,
      kv_bytes=bytes_read,
    )
    if isinstance(attention, str):
      record["skipped"] = attention
      records.append(record)
      continue
    try:
      record.update(time_call(jax.jit(attention), (q, k, v, lengths), warmup, repeats))
      record["gbs"] = bytes_read / (record["median_ms"] * 1e-3) / 1e9
      if peak_bw_gbs:
        record["frac_peak_bw"] = record["gbs"] / peak_bw_gbs
    except Exception as error:  # an unsupported baseline must not stop the sweep
      record["skipped"] = f"failed: {type(error).__name__}: {error}"[:300]
    if name == "pallas":
      record.update(errors)
    records.append(record)
  return records


def _print_table(records: List[Dict[str, Any]]) -> None:
  header = (
    f"{'kernel':7} {'mode':7} {'impl':22} {'shape':38} {'ms':>9} "
    f"{'TFLOP/s':>8} {'GB/s':>8} {'%peak':>6}  notes"
  )
  print(header)
  print("-" * len(header))
  for r in records:
    if r["kernel"] == "flash":
      shape = (
        f"b{r['batch']} t{r['seq_len']} h{r['heads']}/{r['kv_heads']} "
        f"d{r['head_dim']}{' causal' if r['causal'] else ''}"
        f"{' local' + str(r['local_block']) if r['local_block'] else ''}"
      )
    else:
      shape = (
        f"b{r['batch']} q{r['q_len']} kv{r['kv_len']} "
        f"h{r['heads']}/{r['kv_heads']} d{r['head_dim']}"
      )
    notes = r.get("skipped", "")
    errs = {k: v for k, v in r.items() if k.startswith("max_err")}
    if errs:
      notes += " ".join(f"{k[8:]}={v:.1e}" for k, v in errs.items())
    ms = f"{r['median_ms']:9.3f}" if "median_ms" in r else f"{'-':>9}"
    tflops = f"{r['tflops']:8.2f}" if "tflops" in r else f"{'':>8}"
    gbs = f"{r['gbs']:8.1f}" if "gbs" in r else f"{'':>8}"
    frac = f"{100 * r['frac_peak_bw']:6.1f}" if "frac_peak_bw" in r else f"{'':>6}"
    print(
      f"{r['kernel']:7} {r['mode']:7} {r['impl']:22} {shape:38} {ms} {tflops} {gbs} {frac}  {notes}"
    )


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum(
    "preset", None, sorted(PRESETS), "Shape grid (default: gpu on a GPU, else cpu).", **fv
  )
  flags.DEFINE_string(
    "out", None, "Write the results as JSON (after every shape; its folder is created).", **fv
  )
  flags.DEFINE_float("peak_bw_gbs", None, "Peak memory bandwidth in GB/s (H100 SXM ~3350).", **fv)
  flags.DEFINE_enum("only", None, ["flash", "decode"], "Time one kernel only.", **fv)
  flags.DEFINE_integer("warmup", None, "Untimed calls first (default: the preset's).", **fv)
  flags.DEFINE_integer("repeats", None, "Timed calls (default: the preset's).", **fv)
  flags.DEFINE_bool(
    "check", True, "Check the kernels against the reference (--nocheck skips it).", **fv
  )


def main(flag_values: flags.FlagValues) -> List[Dict[str, Any]]:
  args = flag_values
  preset_name = args.preset or ("gpu" if jax.default_backend() == "gpu" else "cpu")
  preset = PRESETS[preset_name]
  dtype = jnp.dtype(preset["dtype"])
  warmup = preset["warmup"] if args.warmup is None else args.warmup
  repeats = preset["repeats"] if args.repeats is None else args.repeats
  device = jax.devices()[0]
  print(
    f"device: {device.device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, preset {preset_name}, dtype {dtype.name}, "
    f"kernel impl {_kernel_impl()}"
  )
  started = time.perf_counter()
  records: List[Dict[str, Any]] = []

  def save(complete: bool) -> None:
    if not args.out:
      return
    meta = dict(
      device=device.device_kind,
      backend=jax.default_backend(),
      jax=jax.__version__,
      python=platform.python_version(),
      preset=preset_name,
      dtype=dtype.name,
      warmup=warmup,
      repeats=repeats,
      peak_bw_gbs=args.peak_bw_gbs,
      kernel_impl=_kernel_impl(),
      seconds=time.perf_counter() - started,
      complete=complete,
    )
    cli.write_json_atomic(args.out, dict(meta=meta, results=records), indent=1)

  if args.only in (None, "flash"):
    for shape in preset["flash"]:
      records += bench_flash(shape, dtype, warmup, repeats, args.check)
      save(complete=False)
  if args.only in (None, "decode"):
    for shape in preset["decode"]:
      records += bench_decode(shape, dtype, warmup, repeats, args.check, args.peak_bw_gbs)
      save(complete=False)
  _print_table(records)
  print(f"total {time.perf_counter() - started:.1f} s")
  save(complete=True)
  if args.out:
    print(f"wrote {args.out}")
  return records


if __name__ == "__main__":
  cli.run(main, define_flags)
