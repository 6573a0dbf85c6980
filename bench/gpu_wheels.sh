#!/usr/bin/env bash
# Here, on the CPU machine with this checkout's .venv: fill .whl/ with the Python 3.12 wheels that the
# lent GPU machine's image lacks (/work/.library/device/KINDS.md lists what it has), at the versions
# this checkout is tested with. bench/gpu_check.sh installs them there. What travels to that machine
# is capped at 64 MiB, so bitsandbytes (43 MB, only the QLoRA-on-GPU test needs it) comes only with
# --qlora, and wandb never (the GPU checks log to no W&B).
#
#   bash bench/gpu_wheels.sh [--qlora]      # then: run(command="bash bench/gpu_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
binary=(transformers peft hjson pydantic pydantic_core annotated-types typing-inspection hydra-core omegaconf
        datasets dill multiprocess nltk defusedxml gguf)
built=(deepspeed antlr4-python3-runtime rouge_score)  # published as sdists only; pure Python, built here
if [[ ${1:-} == --qlora ]]; then binary+=(bitsandbytes); fi

pins() { "$py" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "$@"; }

rm -rf .whl && mkdir .whl
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
# shellcheck disable=SC2046  # one argument per pin
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $(pins "${binary[@]}")
# shellcheck disable=SC2046
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl $(pins "${built[@]}")
ls .whl
du -sh .whl
