#!/usr/bin/env bash
# ReDrafter on a GPU, as a second, optional device run after gpu_session.sh
# (same set-up: the gin-config wheel in .whl, see that header):
#   command: bash experiments/gpu_redrafter.sh     carry: [".whl"]     timeout_s: 400
# Trains the quickstart vanilla run (the base model), then runs
# experiments.redrafter_bench against it: tokens per base-model step and the
# wall-clock speedup of speculative over greedy decoding, side by side, where a
# decode step is memory-bound. Not yet run on a GPU as of 2026-11-30.
OUT_DEFAULT=out/gpu_redrafter
source "$(dirname "$0")/gpu_env.sh"
{
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1; date -u
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/log.txt"
echo "=== train quickstart_vanilla" | tee -a "$OUT/log.txt"
timeout 200 python3 -m bt_jax.train --gin_file=gin_configs/runs/quickstart_vanilla.gin \
    --workdir=/tmp/qs_vanilla 2>&1 | grep -v "^[IW][0-9]\{4\} \|%|" | tail -n 3 | tee -a "$OUT/log.txt"
echo "=== redrafter_bench" | tee -a "$OUT/log.txt"
timeout 180 python3 -m experiments.redrafter_bench --workdir /tmp/qs_vanilla \
    --batch_sizes 1,8 --beam_widths 1,4 --repeats 10 --out "$OUT/redrafter_gpu.json" \
    --plot "$OUT/redrafter_gpu.png" 2>&1 \
    | grep -v "^[IW][0-9]\{4\} \|%|" | tail -n 16 | tee -a "$OUT/log.txt"
echo "done in $SECONDS s" | tee -a "$OUT/log.txt"
