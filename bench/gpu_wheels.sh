#!/usr/bin/env bash
# Here, on a CPU machine with PyPI: fill .whl/ (or $FTL_WHEELS) with the Python 3.12 wheels that
# ftl needs and the lent GPU machine's image lacks; bench/gpu_check.sh installs them there. The
# image (/work/.library/device/KINDS.md) has torch 2.11.0, transformers 5.17.0, huggingface_hub
# 1.33.0, accelerate 1.15.0 ...: those are used as they are, never carried (bench/gpu_wheels_check.py
# keeps the table of what the image has). The versions below are pinned for that image, not read
# from any local venv: ftl is tested against them by tests/test_gpu_wheels.py's CPU rehearsal.
#   peft is carried although the image has one: its version there was never read.
#   pydantic 2.11 (deepspeed's) asks typing-extensions>=4.12.2 of the image, 2.14 would ask 4.16.
#   wandb is never carried: the GPU checks log to no W&B.
# At its end it runs the guards: what travels (wheels + tracked files) is at most 60 MiB, and every
# carried wheel's requirements are met by the carried set and the image.
#
#   bash bench/gpu_wheels.sh      # then: run(command="bash bench/gpu_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}  # any Python with pip, packaging, and (for deepspeed's build) torch
out=${FTL_WHEELS:-.whl}
binary=(peft==0.21.2 liger-kernel==0.8.5 bitsandbytes==0.50.2
        hjson==3.1.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1  # deepspeed's
        hydra-core==1.3.8 omegaconf==2.3.1
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        nltk==3.10.4 defusedxml==0.7.1 gguf==0.19.0  # rouge-score's, and the GGUF demo model's reader
        detect-secrets==1.5.0 phonenumberslite==9.0.42 python-stdnum==2.2)  # data.privacy's scan
built=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3 rouge-score==0.1.2)  # sdists only; pure Python, built here

rm -rf "$out" && mkdir -p "$out"
if [[ $out == .whl ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" && { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"; }
fi
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$out" "${binary[@]}"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "${built[@]}"
ls -s --block-size=K "$out"
"$py" bench/gpu_wheels_check.py "$out"
