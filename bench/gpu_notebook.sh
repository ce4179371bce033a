#!/bin/bash
# On the GPU machine, from the repo root: execute notebooks/05_kernel_speed.ipynb live (the
# benchmark sweep runs on the GPU) through seerlib.report, into $OUT. Wheels: bench/README.md.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/device.txt
python3 -c 'import torch, triton, papermill, plotly; print(torch.__version__, triton.__version__, papermill.__version__, plotly.__version__, torch.cuda.get_device_name())' | tee -a $OUT/device.txt
mkdir -p $OUT/gpu
python3 -m seerlib.report --notebooks 05_kernel_speed --out $OUT/gpu --log "$@" 2>&1 | tee $OUT/log.txt
rc=$?
cp reports/bench/*.json $OUT/ 2>/dev/null
ls -la $OUT $OUT/gpu
exit $rc
