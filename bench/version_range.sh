#!/usr/bin/env bash
# The fast paths on the oldest and the newest versions of the ranges they were checked on
# (src/tunesmith/accel/compat.py CHECKED, the same ranges as pyproject.toml): a fresh virtual
# environment per end of the ranges, then the tests of everything that reads those libraries'
# insides (the fast paths against the plain path, PEFT's LoRA layers, the QLoRA base and merge).
#
#   bash bench/version_range.sh            # both ends; about 10 minutes on 2 cores
#   ENDS=newest bash bench/version_range.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-torch==2.13.0}
declare -A PINS=(
    [oldest]="transformers==5.23.0 peft==0.21.0 bitsandbytes==0.50.0"
    [newest]="transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2"
)
TESTS="tests/test_accel.py tests/test_accel_fused.py tests/test_accel_cpu_attention.py tests/test_accel_lora_linear.py
       tests/test_loss.py tests/test_methods.py"
for end in ${ENDS:-oldest newest}; do
    venv=/tmp/tunesmith-range-$end
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "$TORCH"
    "$venv/bin/pip" install -q -e ".[data,qlora,test]" ${PINS[$end]}
    echo "== $end: $("$venv/bin/python" -c 'import transformers, peft, bitsandbytes as b; print("transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", b.__version__)')"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -3
done
