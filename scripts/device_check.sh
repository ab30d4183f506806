#!/usr/bin/env bash
# GPU device check (issue 3): a gpu="H100" function runs on the local provider of a GPU host, is matched to
# the detected GPU, and sees it inside the worker. Runs from the repository root of a GPU machine that has
# the project's dependencies importable (on the lent device: wheels in .whl/, see the device tool's README).
#   bash scripts/device_check.sh            # uses the GPU type nvidia-smi reports; H100 by default
set -uo pipefail
if [ -d .whl ] && [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
# PYTHONSAFEPATH: import the installed package, not the source tree (whose layout needs an install)
export CLOUDMODAL_HOME=$(mktemp -d) PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
echo "== host"; nvidia-smi -L; python3 --version
gpu=$(${PYTHON:-python3} -c 'from cloudmodal.providers.gpu import detect_gpus; d = detect_gpus(); print(d[0].name if d else "H100")')
echo "== detected GPU type: $gpu"
cloudmodal server start
echo "== cloudmodal run examples/gpu_check.py --gpu $gpu"
cloudmodal run examples/gpu_check.py --gpu "$gpu"; rc=$?
echo "== its events"
cloudmodal app events gpu-check
echo "== the same function asking for two of them (this host has one): a clear error expected"
cloudmodal run examples/gpu_check.py --gpu "$gpu:2"; echo "exit code $?"
cloudmodal server stop
exit $rc
