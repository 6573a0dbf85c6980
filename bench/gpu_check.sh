#!/usr/bin/env bash
# There, on a lent GPU machine: every GPU check in one call of at most 10 minutes. docs/GPU_CHECK.md
# says how to run it and read it.
#
#   bash bench/gpu_wheels.sh                                                 # here, once: the packages it lacks
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)   # the device tool
#   FTL_GPU_CHECK_DRY=1 bash bench/gpu_check.sh                              # here: the steps and their limits, nothing run
#
# Steps in order of value, so a cut call loses the least: each under its own `timeout`, a failed one
# never stops the next, their limits together at most 540 s (the rest of the 600 s is the wheels'
# install). Three files in $OUT (the device tool's folder; ./gpu-check/ elsewhere), written as it
# goes, so a cut call still returns what ran:
#   check.log    every step's whole output
#   summary.txt  one line per step as it ends: PASS, FAIL or SKIP (needs a GPU, none seen), seconds, key numbers
#   runs.tgz     the training runs' config.yaml, metrics.jsonl, eval.json and logs, packed again after each run step
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${FTL_GPU_CHECK_BUDGET_S:-540}  # the call's 600 s less the install; the variable is for the test of this refusal
dry=${FTL_GPU_CHECK_DRY:-}
out=${OUT:-gpu-check}
runs=/tmp/ftl-gpu-runs
total=0
status=0

if [[ -z $dry ]]; then
    mkdir -p "$out"
    rm -f "$out/check.log" "$out/summary.txt" "$out/runs.tgz"
    exec > >(tee -a "$out/check.log") 2>&1
    tee_pid=$!
    echo "gpu_check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(hostname)"
    wheels=${FTL_WHEELS:-.whl}  # another folder of wheels, or an empty one to install nothing
    if compgen -G "$wheels/*.whl" > /dev/null; then
        if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl; then
            echo "FAIL  wheels  the install from $wheels failed: nothing else ran" >> "$out/summary.txt"
            exit 1
        fi
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
    export FTL_CACHE=${FTL_CACHE:-/tmp/ftl-cache}
    rm -rf "$runs"
    mkdir -p "$runs"
    work=$(mktemp -d /tmp/ftl-gpu-check.XXXXXX)
    export runs work
fi

pack_runs() {  # runs.tgz: each run's config, metrics, eval and log, as they are now
    (cd "$runs" && find . -maxdepth 2 \( -name config.yaml -o -name metrics.jsonl -o -name eval.json -o -name '*.log' \) -print0 |
        tar -czf "$work/runs.tgz" --null -T -) && cp "$work/runs.tgz" "$out/runs.tgz"
}

step() {  # step NAME LIMIT COMMAND...: dry, list it; else run it under `timeout LIMIT`, log it, summarise it
    local name=$1 limit=$2
    shift 2
    total=$((total + limit))
    if [[ -n $dry ]]; then
        printf '%-12s %4d s  %s\n' "$name" "$limit" "$*"
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    local started=$SECONDS
    timeout -k 3 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$work/step.txt"  # bash: a step may be a function here
    local rc=${PIPESTATUS[0]} seconds=$((SECONDS - started)) verdict=FAIL
    echo "== $name: exit $rc after ${seconds}s"
    local key
    key=$(grep '^SUMMARY ' "$work/step.txt" | tail -1 | cut -c9-)
    [[ -n $key ]] || key=$(grep -v '^\s*$' "$work/step.txt" | tail -1)
    case $rc in
        0) verdict=PASS ;;
        3) verdict=SKIP ;;  # the benches' "no GPU" exit
        124 | 137) key="timed out at ${limit}s; ${key}" ;;
    esac
    ((rc == 0)) || status=1
    printf '%-4s  %-12s %4ds/%ds  %s\n' "$verdict" "$name" "$seconds" "$limit" "${key:0:300}" >> "$out/summary.txt"
    pack_runs
}

pytest_gpu() {  # the gpu-marked tests (test_bench_quick's run the benches below: left out); SKIP when none ran
    local files
    mapfile -t files < <(grep -rl 'mark\.gpu' tests --include='test_*.py' | grep -v 'tests/test_bench_quick.py' | sort)
    python3 -m pytest -m gpu -v -rs -p no:cacheprovider "${files[@]}" | tee "$work/pytest.txt"
    local rc=${PIPESTATUS[0]}
    echo "SUMMARY $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$work/pytest.txt" | tail -1 | tr -d '=')"
    if ((rc == 0)) && ! grep -qE '[0-9]+ passed' "$work/pytest.txt"; then return 3; fi
    return "$rc"
}

export -f pytest_gpu
[[ -n $dry ]] || pack_runs  # runs.tgz from the start: the three files are there whatever is cut

step env 30 python3 bench/gpu_env.py
step pytest-gpu 70 pytest_gpu
# bench/gpu_runs.py's RUNS, the more valuable wave first; each run's limit a little under its step's.
step train-a 95 python3 bench/gpu_runs.py train "$runs" --parallel 6 --timeout 88 single single-compiled zero3-generate lora-liger qlora dpo-adapters-off
step train-b 80 python3 bench/gpu_runs.py train "$runs" --parallel 7 --timeout 73 zero1 zero2 qlora-compiled qlora-zero3 lora-ac lora-ac-offload dpo-precomputed
step runs-check 15 python3 bench/gpu_runs.py metrics "$runs"
step planner 10 python3 bench/gpu_runs.py planner "$runs"
step engines 65 python3 bench/gpu_engines.py --parallel 6 --timeout 58
step mfu 140 python3 bench/gpu_mfu.py --require-gpu --head --rows fsdp-compiled,zero3,fsdp,fsdp-compiled-ac --layers 4 \
    --seq-len 4096 --steps 6 --warmup 2 --timeout 50 --budget 132
step attention 25 python3 bench/gpu_attention.py --require-gpu --require-flash --rounds 3 --repeats 5

if [[ -n $dry ]]; then
    echo "total ${total} s of ${BUDGET_S} s allowed"
    ((total <= BUDGET_S))
    exit
fi
rm -rf "$work"
echo "gpu_check: done, exit $status; summary:"
cat "$out/summary.txt"
exec >&- 2>&-
wait "$tee_pid"  # check.log whole before the call returns
exit $status
