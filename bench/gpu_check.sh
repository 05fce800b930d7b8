#!/usr/bin/env bash
# The GPU check, in one go (issue 19): on a machine with CUDA, within 8 minutes on one H200.
#
#   bash bench/gpu_check.sh prepare     # here, with network: the wheels the GPU machine lacks -> .whl/
#   bash bench/gpu_check.sh             # there (or anywhere): install them, run everything, one table
#   QUICK=1 bash bench/gpu_check.sh     # the same flow with tiny shapes (runs on a CPU in minutes)
#
# On the device machine of this workplace: `prepare` here, then one run with carry [".whl"] and
# the command `bash bench/gpu_check.sh` with timeout_s 600 ($OUT is set there: its files come back).
#
# Runs: tunesmith against TRL SFTTrainer + peft on the Llama-3.1-8B shape (QLoRA r=32 with bf16
# adapters as TRL keeps them, and LoRA bf16, batch 2 x accumulation 4, 2048 tokens, both with gradient checkpointing, and tunesmith's LoRA
# without it for the MFU target: bench/gpu_compare.py, alone on the GPU since it times; tunesmith's
# QLoRA and LoRA runs end with one more step, profiled, not timed: where its device time goes); then, side by side, `plan` against
# measured memory in six set-ups on four shapes (bench/plan_gpu.py) and the test suite with CUDA visible (tests
# that need CUDA run, among them the fast paths against fast_paths=off on tiny models in
# tests/test_accel.py; those that need chromium skip), and the fast paths against fast_paths=off as
# a table (bench/fast_vs_plain.py). Writes $OUT/summary.txt (OUT defaults to
# ./gpu-check), each failing test with its traceback in $OUT/failures.txt as it happens.
# STAGES="compare profile" adds a longer profile in processes of its own (bench/gpu_profile.py, QLoRA and LoRA).
# First run on an H200, 2026-12-04 (bench/RESULTS.md): the comparison took about 200 s, the plan
# 134 s alone, the suite more than 150 s (it was stopped at 61% then).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
    # The image there has torch, transformers (older than the range tunesmith checks), peft and
    # accelerate; the rest travels as wheels (Python 3.12, manylinux, no dependencies resolved
    # there), within the 64 MiB the working tree may carry: no selenium (no browser there: its
    # tests skip), bitsandbytes with its CPU and CUDA 13 libraries only (the image's torch is
    # built on CUDA 13; the wheel's eleven other builds are 30 of its 43 MB).
    # WHEEL_PYTHON=3.11: the same set for this machine's Python, to rehearse the install here.
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" .whl
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    for pkg in transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 \
               pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 \
               gguf==0.19.0 multiprocess==0.70.18 dill==0.4.0 bm25s==0.3.16 datasketch==2.0.0 \
               nltk==3.10.4 defusedxml==0.7.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
               referencing==0.37.0 rpds-py==2026.9.1; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
            -d .whl "$pkg" || echo "could not fetch $pkg" >&2
    done
    # rouge-score is published as a source archive only: a pure-Python wheel is built here.
    $PY -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2 || echo "could not build rouge-score" >&2
    $PY - .whl/bitsandbytes-*.whl <<'SLIM'
import re, sys, zipfile
path = sys.argv[1]
keep = lambda name: not re.search(r"libbitsandbytes_(?!cpu|cuda13)", name)
with zipfile.ZipFile(path) as wheel:
    entries = [(info, wheel.read(info)) for info in wheel.infolist() if keep(info.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
    for info, data in entries:
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
        wheel.writestr(info, data)
SLIM
    du -sh .whl
    exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TUNESMITH_CACHE=${TUNESMITH_CACHE:-/tmp/tunesmith-cache}
# The image has JAX: anything that starts it on the GPU would take 75% of the card (it did on
# 2026-12-04, through bm25s; tunesmith keeps it on the CPU now). Insurance for the stages beside each other.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"

if [ -n "${QUICK:-}" ]; then
    SHAPE=tiny STEPS=3 WARMUP=1 LENGTH=256 TESTS=${TESTS:-tests/test_accel.py}
else
    SHAPE=llama-3.1-8b STEPS=${STEPS:-5} WARMUP=${WARMUP:-2} LENGTH=2048 TESTS=${TESTS:-tests}
fi
# STAGES picks and orders the stages (a device call may run them in two goes; "a+b" runs two side
# by side); each has its own limit: the device tool stops a command at 10 minutes, and the
# defaults come to 8 minutes plus the install (280 s, then max(190, 120, 200) s) where every stage runs to its limit, the most
# telling first,
# each appending to the summary as it ends, so a run cut short still brings back what it measured.
STAGES=${STAGES:-compare plan+tests+fastpaths}
MODELS=${MODELS:-/tmp/gpu-check-models}  # built once by the comparison, reused by the plan

timed() {  # NAME LIMIT COMMAND...: the command's output in $OUT/NAME.txt with its exit status, then in the summary
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $?" >> "$OUT/$name.txt"
    cat "$OUT/$name.txt" >> "$OUT/summary.txt"
}

compare() {
    # METHODS="qlora:bf16,qlora:bf16:plain,lora" (say) changes tunesmith's runs (bench/gpu_compare.py --methods;
    # :plain = fast_paths off, :offload = activations in host memory, :nockpt = no checkpointing)
    timed compare "${COMPARE_LIMIT:-280}" $PY bench/gpu_compare.py --shape "$SHAPE" --steps "$STEPS" \
        --warmup "$WARMUP" --length "$LENGTH" --models "$MODELS" --out "$OUT/compare.json" ${METHODS:+--methods "$METHODS"}
}

fastpaths() {
    # The fast paths against fast_paths=off on tiny Llama, Qwen2 and Mistral, as a table (also in the suite).
    timed fastpaths "${FASTPATHS_LIMIT:-120}" $PY bench/fast_vs_plain.py
}

plan() {
    # Six set-ups, and three small shapes built first: about 170 s estimated (not yet run).
    timed plan "${PLAN_LIMIT:-190}" $PY bench/plan_gpu.py ${QUICK:+--quick} --models "$MODELS"
}

profile() {
    # Not in the default stages (the comparison profiles a step of each): two steps each of QLoRA
    # then LoRA in processes of their own (bench/gpu_profile.py).
    for method in qlora lora; do
        timeout "${PROFILE_LIMIT:-120}" $PY bench/gpu_profile.py --shape "$SHAPE" --method "$method" --seq "$LENGTH" \
            --models "$MODELS"
    done > "$OUT/profile.txt" 2>&1
    echo "profile: $OUT/profile.txt ($(grep -c . "$OUT/profile.txt") lines)" >> "$OUT/summary.txt"
}

tests() {
    # Every failure listed (no -x); in parallel where pytest-xdist is there (the image has it: the
    # suite takes 5 minutes on 2 cores here), one thread per worker beside the plan; no test may
    # hang the stage.
    local began workers="" limit=""
    began=$(date +%s)
    $PY -c "import xdist" 2>/dev/null && workers="-n ${TEST_WORKERS:-14}"
    # Below the stage's limit, or a hung test would hold its worker until the stage is killed, unnamed.
    $PY -c "import pytest_timeout" 2>/dev/null && limit="--timeout=${TEST_TIMEOUT:-90}"
    : > "$OUT/failures.txt"  # each failure as it happens (bench/stream_failures.py)
    # One inductor compile thread per worker: by default each of the 14 workers starts a pool of
    # compile processes as large as the machine (the first run's three C++-compile timeouts).
    STREAM_FAILURES=$OUT/failures.txt PYTHONPATH=$PWD/bench:$PYTHONPATH OMP_NUM_THREADS=${TEST_THREADS:-1} \
        TORCHINDUCTOR_COMPILE_THREADS=1 \
        timeout "${TEST_LIMIT:-200}" $PY -m pytest -q -rfE --tb=short -p no:cacheprovider -p stream_failures \
        $workers $limit $TESTS > "$OUT/tests.txt" 2>&1
    local status=$?  # 124: stopped by TEST_LIMIT, the suite not through
    { echo "tests: $(tail -1 "$OUT/tests.txt") ($(( $(date +%s) - began )) s, exit $status)"
      grep -E "^==== " "$OUT/failures.txt" | head -60; } >> "$OUT/summary.txt"
}

start=$(date +%s)
cp "$OUT/device.txt" "$OUT/summary.txt"
# A stage written "plan+tests" runs the two side by side (neither is a timing).
for stage in $STAGES; do
    if [[ $stage == *+* ]]; then
        for part in ${stage//+/ }; do "$part" & done
        wait
    else
        "$stage"
    fi
done
echo "total $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
