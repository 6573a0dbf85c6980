#!/usr/bin/env bash
# There, on a lent GPU machine: every GPU check and benchmark in one call of a few minutes.
#
#   bash bench/gpu_wheels.sh                                       # here, once: the packages it lacks
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)   # the device tool
#
# Installs .whl/ (if present) into /tmp/site ahead of the image's own packages, then runs the
# gpu-marked tests (tests/model/test_attention.py, test_peft.py, test_bench_quick.py; bench/gpu_mfu.py's
# quick test is left to the full run below), bench/gpu_attention.py and bench/gpu_mfu.py, each
# under a time limit that keeps the whole inside 9 minutes. Logs and tables go to $OUT (the device
# tool's folder) or ./gpu-check/. Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
wheels=${FTL_WHEELS:-.whl}  # another folder of wheels, or an empty one to install nothing
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions

status=0
step() {  # step NAME SECONDS COMMAND...: log to $out/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    ((rc == 0)) || status=1
}
step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "import torch, transformers, deepspeed, peft; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
    \"transformers\", transformers.__version__, \"deepspeed\", deepspeed.__version__, \"peft\", peft.__version__)"'
step pytest-gpu 180 python3 -m pytest -m gpu -rs -p no:cacheprovider tests/model/test_attention.py tests/model/test_peft.py tests/model/test_families.py \
    tests/test_bench_quick.py --deselect 'tests/test_bench_quick.py::test_gpu_quick_mode_prints_every_row[gpu_mfu]'
step gpu_attention 60 python3 bench/gpu_attention.py --require-gpu
step gpu_mfu 240 python3 bench/gpu_mfu.py --require-gpu --timeout 110
exit $status
