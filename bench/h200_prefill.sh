#!/bin/bash
# Issue 13's GPU runs (prefill that pays), as run on this workplace's H200; random weights, no
# model carried. Stages, each well inside one 10-minute device call:
#   check   versions (device.txt), then the CUDA tests of the graphs, the pooling, the prefill
#           and decode selections and the kernels (CHECK_TIMEOUT, default 150 s)
#   tune    the block-sparse forward's launch / TMA / warp-specialization variants at 32k
#           (bench_attention.py --tune seer; TUNE_SHAPES, default "8b smollm2")
#   pair    the paired key-block loop (pair_blocks) beside the unpaired one, both shapes, 32k
#   attn    the kernel sweep at both head layouts at 32k (bench_attention.py), the README's
#           kernel figures of the same session
#   smol    bench_prefill, SmolLM2's shape at 8k and 32k
#   8b32    bench_prefill, Llama-3-8B's shape, 8 layers, 32k
#   8b      bench_prefill, Llama-3-8B's shape, 4 layers, 8k and 128k
#   glogits the one-launch gate logits' tile shapes and warps beside the gate's torch ops
#           (bench/tune_gate_logits.py, both shapes, 8k and 32k; about a minute)
#   whole   the whole forward as one CUDA graph (PrefillGraph): its GPU tests, then SmolLM2 at 8k
#           and 32k and the 8B shape (8 layers) at 32k, sparse (gate logits eager or compiled)
#           and dense, per-layer graphs beside it (about 8 minutes: a call of its own)
# Usage on the device: bash bench/h200_prefill.sh STAGE [STAGE ...]   (results under $OUT);
# `check smol 8b32` in one call, `8b` (or `tune`) in another
# Then here: python bench/bench_prefill.py --merge <the prefill JSONs> --out bench/results
set -euo pipefail
source "$(dirname "$0")/_h200_env.sh"
export TORCHINDUCTOR_COMPILE_THREADS=1
ROWS=(sdpa_flash sdpa_cudnn gate@0.1 graph:gate@0.1 graph+compile:gate@0.1
      graph+compile:recommended@0.1 sink_window@0.1 ideal@0.1 pstep@0.1 pcstep@0.1)
[ -n "${PREFILL_ROWS:-}" ] && read -ra ROWS <<< "$PREFILL_ROWS"  # fewer rows for a short call

prefill() {  # TAG SHAPE TIMEOUT BUDGET LENGTHS... (PREFILL_TIMEOUT / PREFILL_BUDGET override)
  local tag=$1 shape=$2 limit=${PREFILL_TIMEOUT:-$3} budget=${PREFILL_BUDGET:-$4}; shift 4
  timeout "$limit" python3 bench/bench_prefill.py --shapes "$shape" \
    --seq-lens "$@" --providers "${ROWS[@]}" ${PREFILL_ARGS:-} --budget-s "$budget" \
    --out "$OUT" --tag "$tag" 2>&1 \
    | grep -v "it/s" | cut -c1-220 | tail -40 || true
}

for stage in "$@"; do
  log "stage $stage"
  case $stage in
    check)
      python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, transformers.__version__)" | tee "$OUT/device.txt"
      # the new paths first: a cut at the time limit loses the older kernel tests, not these
      timeout ${CHECK_TIMEOUT:-150} python3 -m pytest -q -rfE -p no:cacheprovider \
        tests/test_gate_logits_kernel.py tests/test_prefill_graph.py tests/test_graphs.py \
        tests/test_block_pool.py tests/test_prefill_select.py tests/test_decode_select.py \
        tests/test_decode_gate_select.py \
        tests/test_block_sparse_tma.py \
        tests/test_kernels.py 2>&1 \
        | tail -15 | tee "$OUT/gpu-tests.txt" || true ;;
    tune)
      timeout ${TUNE_TIMEOUT:-540} python3 bench/bench_attention.py --tune seer --shape ${TUNE_SHAPES:-8b smollm2} \
        --seq-lens 32768 --out "$OUT" --tag "${TAG:-}" 2>&1 | cut -c1-200 | tail -60 || true ;;
    pair)  # the paired loop beside the unpaired one, 8 variants per shape (about 2-3 min)
      timeout ${TUNE_TIMEOUT:-200} python3 bench/bench_attention.py --tune seer --tune-variants pair \
        --shape ${TUNE_SHAPES:-smollm2 8b} --seq-lens 32768 --out "$OUT" --tag "${TAG:-}" 2>&1 | cut -c1-200 \
        | tail -40 || true ;;
    attn)
      for shape in 8b smollm2; do
        timeout 270 python3 bench/bench_attention.py --shape $shape --seq-lens 32768 \
          --sparsities 0 0.9 --out "$OUT" --tag "${TAG:-}" 2>&1 | cut -c1-200 | tail -25 || true
      done ;;
    # default limits so that `check smol 8b32` fits one 10-minute call (about 9 min at most)
    glogits)
      timeout ${TUNE_TIMEOUT:-150} python3 bench/tune_gate_logits.py --out "$OUT" --tag "${TAG:-}" \
        2>&1 | tail -8 || true ;;
    smol) prefill _smol smollm2 280 220 8192 32768 ;;
    8b32) prefill _8b32 llama3-8b:8 150 90 32768 ;;
    8b) prefill _8b llama3-8b:4 540 420 8192 131072 ;;
    whole)
      timeout 90 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_prefill_graph.py \
        2>&1 | tail -6 | tee "$OUT/gpu-tests-whole.txt" || true
      saved=("${ROWS[@]}")  # the other stages keep their rows
      ROWS=(sdpa_cudnn whole:sdpa_cudnn graph:gate@0.1 whole:gate@0.1 whole+compile:gate@0.1
            ideal@0.1 pstep@0.1 pcstep@0.1)
      PREFILL_ARGS="--profile" prefill _whole smollm2 240 200 8192 32768
      ROWS=(sdpa_flash sdpa_cudnn whole:sdpa_cudnn graph:gate@0.1 whole:gate@0.1
            whole+compile:gate@0.1 ideal@0.1)
      prefill _whole8b llama3-8b:8 140 110 32768
      ROWS=("${saved[@]}") ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
