#!/usr/bin/env bash
# There, on a lent GPU machine: every GPU check in one call of at most 7 minutes, the machine's
# start and the wheel install included, leaving room to run it again within 15 minutes.
#
#   bash bench/gpu_wheels.sh                                       # here, once: the packages it lacks
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)   # the device tool
#
# In order, each step logged to $OUT/<step>.log (the device tool's folder) or ./gpu-check/:
#   env          versions, the GPU, and whether torch's flash varlen kernel is there
#   pytest-gpu   the gpu-marked tests, attention first
#   train-single a 5-step `ftl train` on cuda, strategy=single (fp32 weights under bf16 autocast),
#   train-zero3  and strategy=zero3 (bf16), both on packed data with sdpa_varlen, then a short eval
#   train-check  bench/gpu_runs.py metrics: the one-call varlen path ran, tokens/s, MFU, peak memory logged
#   gpu_mfu      bench/gpu_mfu.py, shortened (2 layers, 1024 tokens, few steps)
#   planner      bench/gpu_runs.py planner: the memory planner's estimate beside the measured peak
# Each step has a time limit, and all of them together FTL_GPU_CHECK_S (default 300 s: the machine
# takes up to ~2 minutes to start and the wheels ~30 s to install). Exit status: non-zero if any
# step failed or was cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
deadline=$((SECONDS + ${FTL_GPU_CHECK_S:-300}))
wheels=${FTL_WHEELS:-.whl}  # another folder of wheels, or an empty one to install nothing
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export FTL_CACHE=${FTL_CACHE:-/tmp/ftl-cache}

status=0
step() {  # step NAME SECONDS COMMAND...: log to $out/NAME.log, remember a failure; never past the deadline
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "== $name: skipped, FTL_GPU_CHECK_S spent" | tee "$out/$name.log"
        status=1
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    ((rc == 0)) || status=1
}

step env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "from importlib.metadata import version
import torch
from launcher.model import attention
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, *(f\"{p} {version(p)}\" for p in (\"transformers\", \"deepspeed\", \"peft\")))
print(\"varlen_attn\", \"available\" if attention.varlen_attn is not None else \"MISSING\", \"native GQA\", attention.VARLEN_GQA,
      \"capability\", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)"'
step pytest-gpu 100 python3 -m pytest -m gpu -rs -p no:cacheprovider tests/model/test_attention.py tests/train/test_prefetch.py \
    tests/model/test_peft.py tests/model/test_families.py tests/train/test_loss.py tests/train/test_offload.py tests/test_bench_quick.py --deselect 'tests/test_bench_quick.py::test_gpu_quick_mode_prints_every_row'

# A Llama-3-8B-shaped model cut to 2 layers (random weights: no hub), the demo data packed into
# 2048-token rows: what the one-call varlen path, MFU and the planner are about, in seconds.
runs=/tmp/ftl-gpu-runs
rm -rf "$runs"
train=(recipe=tiny model=llama3-8b model.source=random "model.tokenizer=$PWD/launcher/assets/tiny-tokenizer" model.arch.num_layers=2
       train.device=cuda train.precision=bf16 data.packing=true train.seq_len=2048 train.micro_batch_size=2 train.grad_accum=2
       train.max_steps=5 train.warmup_steps=1 checkpoint.every_steps=0 checkpoint.save_final=false eval.max_batches=1
       eval.generate=true eval.num_generate=2 eval.max_new_tokens=8 wandb.mode=disabled launch.dist_timeout_s=120)
step train-single 90 python3 -m launcher train "${train[@]}" strategy=single train.compile=true "run.dir=$runs/single"  # compiled layers on CUDA
step train-zero3 70 python3 -m launcher train "${train[@]}" strategy=zero3 "run.dir=$runs/zero3"
step train-check 10 python3 bench/gpu_runs.py metrics "$runs/single" "$runs/zero3"
step gpu_mfu 50 python3 bench/gpu_mfu.py --require-gpu --quick --timeout 22
step planner 10 python3 bench/gpu_runs.py planner "$runs/single" "$runs/zero3"
exit $status
