"""Tree Attention vs ring baselines for sharded decode attention.

    python -m experiments.tree_vs_ring [--preset cpu|gpu] [--contexts 4096,16384]
        [--devices 2,4,8] [--methods tree,ring_kv] [--two_level 2x4] [--out DIR]

Sweeps the context length and the number of devices p on a 1-D `sequence`
mesh and, for each point, times tree (all-reduce merge), tree_butterfly
(log2 p explicit exchanges), ring_kv (the paper's Ring Attention baseline),
ring_partials, and the whole cache on one device. Bytes each device sends are
read from the compiled HLO (operand sizes of its collectives) and also given
by formula. Writes DIR/tree_vs_ring.json (rewritten after every measurement, so
a crash keeps what was measured) and DIR/tree_vs_ring.png and prints a table.

--preset cpu forces 8 host devices (it sets XLA_FLAGS before importing jax)
and uses a small head configuration; --preset gpu uses the real devices.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from bt_jax import cli

PRESETS = {
  "cpu": dict(
    contexts=[4096, 16384, 65536, 131072],
    devices=[2, 4, 8],
    batch=1,
    q_len=1,
    heads=8,
    kv_heads=2,
    head_dim=64,
    dtype="float32",
    warmup=1,
    repeats=5,
  ),
  "gpu": dict(
    contexts=[32768, 131072, 524288, 1048576],
    devices=None,
    batch=1,
    q_len=1,
    heads=16,
    kv_heads=16,
    head_dim=128,
    dtype="bfloat16",
    warmup=3,
    repeats=10,
  ),
}
SHARDED_METHODS = ("tree", "tree_butterfly", "ring_kv", "ring_partials")


INT_SETTINGS = ("batch", "q_len", "heads", "kv_heads", "head_dim", "warmup", "repeats")


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Defaults for the flags below.", **fv)
  flags.DEFINE_list(
    "contexts", None, "Comma-separated context lengths (tokens); each divisible by p.", **fv
  )
  flags.DEFINE_list(
    "devices", None, "Comma-separated device counts p (default: the preset's; gpu: all).", **fv
  )
  flags.DEFINE_list(
    "methods",
    list(SHARDED_METHODS),
    f"Comma-separated sharded methods to time, of {','.join(SHARDED_METHODS)}.",
    **fv,
  )
  flags.DEFINE_string(
    "two_level",
    None,
    "NODESxLOCAL: also time tree_two_level on a (node, local) mesh, e.g. 2x4.",
    **fv,
  )
  for name in INT_SETTINGS:
    flags.DEFINE_integer(name, None, f"{name} (default: the preset's).", **fv)
  flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"], "Cache dtype (default: the preset's).", **fv
  )
  flags.DEFINE_string("impl", None, "decode_attention impl (default: auto).", **fv)
  flags.DEFINE_string("out", "out/tree_vs_ring", "Output folder (created).", **fv)


def _ints(flag: str, values):
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise cli.UserError(
      f"--{flag} {','.join(values)!r} must be comma-separated integers, e.g. 4096,16384"
    ) from e


def config_from_flags(flag_values: flags.FlagValues) -> dict:
  """The run's settings: the preset's, overridden by the flags given."""
  config = dict(PRESETS[flag_values.preset])
  for key in INT_SETTINGS + ("dtype",):
    if flag_values[key].value is not None:
      config[key] = flag_values[key].value
  for key in ("contexts", "devices"):
    if flag_values[key].value is not None:
      config[key] = _ints(key, flag_values[key].value)
  methods = [m.strip() for m in flag_values.methods if m.strip()]
  unknown = sorted(set(methods) - set(SHARDED_METHODS))
  if unknown:
    raise cli.UserError(f"--methods {unknown} unknown; valid: {list(SHARDED_METHODS)}")
  two_level = flag_values.two_level
  if two_level is not None:
    parts = two_level.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
      raise cli.UserError(f"--two_level {two_level!r} must be NODESxLOCAL, e.g. 2x4")
  config.update(
    preset=flag_values.preset,
    methods=methods,
    impl=flag_values.impl,
    two_level=two_level,
    out=flag_values.out,
  )
  return config


def force_host_devices(count: int) -> None:
  """Must run before jax initialises its backends: XLA reads the flag once."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={count}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run(config, on_result=None):
  """Times every point; on_result(results so far) after each measurement."""
  if config["preset"] == "cpu":
    force_host_devices(max(config["devices"] + [8]))
  import jax
  import jax.numpy as jnp

  from bt_jax.attention import decode_attention
  from bt_jax.distributed import decode_shardings, make_sequence_mesh, make_two_level_mesh
  from bt_jax.distributed.study import collective_traffic, formula_traffic
  from bt_jax.distributed.study import make_method_attention as make_sharded_decode_attention
  from experiments.timing import time_call

  devices = config["devices"] or [jax.device_count()]
  if max(devices) > jax.device_count():
    raise SystemExit(
      f"--devices {devices} needs {max(devices)} devices; this backend has {jax.device_count()}"
    )
  config["devices"] = devices
  dtype = jnp.dtype(config["dtype"])
  batch, q_len, heads = config["batch"], config["q_len"], config["heads"]
  kv_heads, head_dim = config["kv_heads"], config["head_dim"]
  impl = config["impl"]
  results = []

  def record(method, p, context, timing, traffic, formula, error, mesh_shape):
    row = dict(
      method=method,
      devices=p,
      mesh=mesh_shape,
      context=context,
      **timing,
      hlo_bytes_per_device=traffic["bytes"],
      hlo_collective_ops=traffic["count"],
      formula_bytes_per_device=formula["bytes"],
      formula_steps=formula["steps"],
      bytes_source=("-" if method == "single_device" else "hlo" if traffic["count"] else "formula"),
      max_abs_err_vs_single=error,
    )
    results.append(row)
    if on_result is not None:
      on_result(results)
    print(
      f"  p={p:<3d} T={context:<8d} {method:15s} "
      f"{row['median_ms']:9.2f} ms  {row['hlo_bytes_per_device']:>12,d} B",
      flush=True,
    )

  def time_sharded(mesh, method, p, context, q, k, v, lengths, single_out, mesh_shape):
    fn = make_sharded_decode_attention(mesh, method=method, impl=impl)
    shardings = decode_shardings(mesh)
    args = (
      jax.device_put(q, shardings["q"]),
      jax.device_put(k, shardings["k_cache"]),
      jax.device_put(v, shardings["v_cache"]),
      jax.device_put(lengths, shardings["lengths"]),
    )
    compiled = fn.jitted.lower(*args).compile()
    traffic = collective_traffic(compiled.as_text())
    out, _ = compiled(*args)
    error = float(jnp.max(jnp.abs(out.astype(jnp.float32) - single_out)))
    formula = formula_traffic(
      method,
      num_devices=p,
      batch=batch,
      q_len=q_len,
      heads=heads,
      kv_heads=kv_heads,
      head_dim=head_dim,
      kv_len=context,
      kv_itemsize=dtype.itemsize,
    )
    timing = time_call(compiled, args, config["warmup"], config["repeats"])
    record(method, p, context, timing, traffic, formula, error, mesh_shape)
    del args

  single = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl=impl))
  for context in config["contexts"]:
    print(f"context {context}", flush=True)
    keys = jax.random.split(jax.random.key(context), 3)
    device0 = jax.devices()[0]
    with jax.default_device(device0):
      q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
      k = jax.random.normal(keys[1], (batch, context, kv_heads, head_dim), dtype)
      v = jax.random.normal(keys[2], (batch, context, kv_heads, head_dim), dtype)
      lengths = jnp.full((batch,), context, jnp.int32)
    single_out = single(q, k, v, lengths)[0].astype(jnp.float32)
    timing = time_call(single, (q, k, v, lengths), config["warmup"], config["repeats"])
    record(
      "single_device", 1, context, timing, dict(bytes=0, count=0), dict(bytes=0, steps=0), 0.0, [1]
    )
    for p in devices:
      if context % p:
        print(f"  skip p={p}: context {context} not divisible", flush=True)
        continue
      mesh = make_sequence_mesh(p)
      for method in config["methods"]:
        if method == "tree_butterfly" and p & (p - 1):
          continue
        time_sharded(mesh, method, p, context, q, k, v, lengths, single_out, [p])
    if config["two_level"]:
      nodes, local = (int(x) for x in config["two_level"].lower().split("x"))
      if context % (nodes * local) == 0:
        mesh = make_two_level_mesh(nodes, local)
        time_sharded(
          mesh,
          "tree_two_level",
          nodes * local,
          context,
          q,
          k,
          v,
          lengths,
          single_out,
          [nodes, local],
        )
    del q, k, v
  return results, dict(
    jax_version=jax.__version__,
    backend=jax.default_backend(),
    device_kind=jax.devices()[0].device_kind,
    device_count=jax.device_count(),
    cpu_count=os.cpu_count(),
  )


def goals(results):
  """The issue's two checks, evaluated on what was measured."""
  tree_bytes = {}
  for r in results:
    if r["method"] == "tree":
      tree_bytes.setdefault(r["devices"], set()).add(r["hlo_bytes_per_device"])
  by_key = {(r["method"], r["devices"], r["context"]): r for r in results}
  comparisons = []
  for (method, p, context), r in sorted(by_key.items()):
    if method == "tree" and context >= 65536 and ("ring_kv", p, context) in by_key:
      ring = by_key[("ring_kv", p, context)]
      comparisons.append(
        dict(
          devices=p,
          context=context,
          tree_ms=r["median_ms"],
          ring_kv_ms=ring["median_ms"],
          speedup=ring["median_ms"] / r["median_ms"],
        )
      )
  at_8 = [c for c in comparisons if c["devices"] == 8]
  return dict(
    tree_bytes_constant_in_context={str(p): len(b) == 1 for p, b in sorted(tree_bytes.items())},
    tree_vs_ring_kv_at_64k_plus=comparisons,
    tree_faster_than_ring_kv_at_64k_plus_on_8=(
      all(c["speedup"] > 1 for c in at_8) if at_8 else None
    ),
  )


def print_table(results):
  header = (
    f"{'p':>3} {'context':>8} {'method':<15} {'median ms':>10} "
    f"{'min ms':>9} {'bytes/dev':>12} {'formula B':>12} {'ops':>4} "
    f"{'steps':>5} {'src':<7} {'err':>8}"
  )
  print(header)
  print("-" * len(header))
  for r in sorted(results, key=lambda r: (r["devices"], r["context"], r["method"])):
    print(
      f"{r['devices']:>3} {r['context']:>8} {r['method']:<15} "
      f"{r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
      f"{r['hlo_bytes_per_device']:>12,d} "
      f"{r['formula_bytes_per_device']:>12,d} "
      f"{r['hlo_collective_ops']:>4} {r['formula_steps']:>5} "
      f"{r['bytes_source']:<7} {r['max_abs_err_vs_single']:>8.1e}"
    )


def print_pivot(results):
  """Median ms per method, one row per (p, context), as a markdown table."""
  methods = ["single_device"] + sorted({r["method"] for r in results} - {"single_device"})
  single = {r["context"]: r for r in results if r["method"] == "single_device"}
  cells = {(r["method"], r["devices"], r["context"]): r for r in results}
  print("| p | context | " + " | ".join(methods) + " | tree B/dev | ring_kv B/dev |")
  print("|" + " --- |" * (len(methods) + 4))
  for p, context in sorted(
    {(r["devices"], r["context"]) for r in results if r["method"] != "single_device"}
  ):
    times = []
    for method in methods:
      row = single.get(context) if method == "single_device" else cells.get((method, p, context))
      times.append(f"{row['median_ms']:.1f}" if row else "-")
    tree_bytes, ring_bytes = (
      f"{cells[(m, p, context)]['hlo_bytes_per_device']:,}" if (m, p, context) in cells else "-"
      for m in ("tree", "ring_kv")
    )
    print(f"| {p} | {context} | " + " | ".join(times) + f" | {tree_bytes} | {ring_bytes} |")


def plot(results, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  device_counts = sorted({r["devices"] for r in results if r["method"] != "single_device"})
  if not device_counts:
    return
  fig, axes = plt.subplots(
    2, len(device_counts), squeeze=False, figsize=(4.5 * len(device_counts), 7)
  )
  single = sorted((r["context"], r["median_ms"]) for r in results if r["method"] == "single_device")
  methods = sorted({r["method"] for r in results} - {"single_device"})
  for col, p in enumerate(device_counts):
    time_ax, bytes_ax = axes[0][col], axes[1][col]
    for method in methods:
      rows = sorted(
        (r["context"], r["median_ms"], r["hlo_bytes_per_device"])
        for r in results
        if r["method"] == method and r["devices"] == p
      )
      if rows:
        x = [c for c, _, _ in rows]
        time_ax.plot(x, [t for _, t, _ in rows], marker="o", label=method)
        bytes_ax.plot(x, [b for _, _, b in rows], marker="o", label=method)
    if single:
      time_ax.plot(
        [c for c, _ in single], [t for _, t in single], "k--", marker="x", label="single device"
      )
    time_ax.set(
      title=f"p = {p}",
      xscale="log",
      yscale="log",
      xlabel="context (tokens)",
      ylabel="median time (ms)",
    )
    bytes_ax.set(
      xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes sent per device (HLO)"
    )
    time_ax.legend(fontsize=7)
    bytes_ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(flag_values: flags.FlagValues):
  config = config_from_flags(flag_values)
  start = time.perf_counter()
  os.makedirs(config["out"], exist_ok=True)
  json_path = os.path.join(config["out"], "tree_vs_ring.json")
  png_path = os.path.join(config["out"], "tree_vs_ring.png")

  def save(results, environment=None):
    cli.write_json_atomic(
      json_path,
      dict(
        config=config,
        environment=environment,
        results=results,
        goals=goals(results),
        complete=environment is not None,
        wall_seconds=round(time.perf_counter() - start, 1),
      ),
    )

  results, environment = run(config, on_result=save)
  save(results, environment)
  with open(json_path, encoding="utf-8") as f:
    report = json.load(f)
  print()
  print_table(results)
  print()
  print_pivot(results)
  print()
  print(
    "bytes/dev: operand bytes of the collectives in the compiled HLO "
    "(src=hlo); formula B: from shapes; ops: collectives in the HLO; "
    "steps: ring p-1, tree ceil(log2 p) (an all-reduce's depth is the "
    "library's choice); err: max |out - single device|"
  )
  print("goals:", json.dumps(report["goals"], indent=1))
  plot(
    results,
    png_path,
    f"{environment['device_kind']} x{environment['device_count']} "
    f"({environment['backend']}), B={config['batch']} H={config['heads']} "
    f"kvH={config['kv_heads']} d={config['head_dim']} {config['dtype']}",
  )
  print(f"wrote {json_path} and {png_path} in {report['wall_seconds']} s")
  return report


if __name__ == "__main__":
  cli.run(main, define_flags)
