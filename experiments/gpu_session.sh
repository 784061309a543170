#!/usr/bin/env bash
# Every GPU-only check of the project in one prepared run, for a session that
# is lent a GPU (the `device` tool: one H100/H200, a 10-minute call, 15 minutes
# of device time per session). Not yet run on a GPU as of 2026-11-30.
#
# The GPU image has jax/jaxlib 0.11 (CUDA), flax, optax, orbax, pytest and
# matplotlib, but not gin-config. Once, here (repository root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl gin-config==0.5.0
# Then call the device tool with
#   command: bash experiments/gpu_session.sh     carry: [".whl"]     timeout_s: 590
# Results land in $OUT (log.txt, three JSON files and a PNG), read-only under files_at.
#
# What it shows (issues 4, 5, 6): the Pallas kernels compile and pass their
# tests on the GPU; kernel timings against XLA and cuDNN (goals: causal flash
# fwd+bwd at 2048/d64/bf16 >= XLA; decode >= 70% of HBM bandwidth); the 85M
# pair's prefill-heavy and decode-heavy throughput (paper, H100: block 85M
# 59.0k and 134.7k tokens/s); tree vs ring on the one GPU (p = 1 only).
OUT_DEFAULT=out/gpu_session
source "$(dirname "$0")/gpu_env.sh"

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$GPU" in
  *H200*) PEAK_BW=4800 ;;   # GB/s, HBM3e
  *H100*) PEAK_BW=3350 ;;   # GB/s, SXM HBM3
  *) PEAK_BW=2000 ;;
esac
{
  echo "gpu: $GPU (peak bandwidth assumed ${PEAK_BW} GB/s)"; date -u
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/log.txt"

# At most 8 files come back from $OUT: every step logs into log.txt, and the
# JSON / PNG outputs make four more.
step() {  # step NAME SECONDS COMMAND...: one check, its own time limit
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s)" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  timeout "$limit" "$@" > /tmp/step.log 2>&1
  local rc=$?
  grep -v "^[IW][0-9]\{4\} " /tmp/step.log >> "$OUT/log.txt"
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  tail -n 25 /tmp/step.log
}

step pallas_tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/pallas_kernels
# Generation with attention_impl "pallas" on the real kernels (flash prefill,
# split-KV decode with per-row starts) against the full forward.
step generate_pallas 60 python3 -m pytest -q -p no:cacheprovider tests/inference/test_generate.py \
    -k "pallas"
step kernel_bench 150 python3 -m experiments.kernel_bench --preset gpu \
    --peak_bw_gbs "$PEAK_BW" --out "$OUT/kernel_bench_gpu.json"
step throughput_85m 200 python3 -m experiments.throughput --preset paper \
    --models block_b4_85m,vanilla_85m --scenarios prefill_heavy,decode_heavy \
    --batch_size auto --peak_bw_gbs "$PEAK_BW" --attention_impl pallas \
    --out "$OUT/throughput_85m.json"
step tree_vs_ring 40 python3 -m experiments.tree_vs_ring --preset gpu --out "$OUT"
echo "done in $SECONDS s"
