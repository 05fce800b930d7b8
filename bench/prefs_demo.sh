#!/usr/bin/env bash
# Preference and reward tuning on the demo task: a weak SFT model (100 tickets), then `pairs` + DPO and
# GRPO from it, and continued SFT on the same answers as the control, all scored on the same 200 held-out
# tickets (README "Beyond imitation", docs/objectives.md). Prints the wall time of each step and the table.
# 56 minutes on 2 AVX-512 bf16 cores (2026-12-04, bench/RESULTS.md). Usage: bash bench/prefs_demo.sh [runs/prefs]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/prefs}
TS=.venv/bin/tunesmith
timed() { local start=$SECONDS; "$@"; echo "[$(( SECONDS - start )) s] $*" | tee -a "$ROOT/times.txt"; }
mkdir -p "$ROOT" && : > "$ROOT/times.txt"
FROM_SFT=(model="$ROOT/sft" data.test="$ROOT/sft/data/test.jsonl")
timed $TS train bench/prefs/sft.yaml output.dir="$ROOT/sft"
timed .venv/bin/python bench/prefs_demo.py prompts "$ROOT"
# pairs: the best and the worst of 4 samples; then the reference answer as the chosen one (SPIN-like)
timed $TS pairs "$ROOT/sft" --data "$ROOT/prompts.jsonl" --samples 4 --max-new-tokens 64 --out "$ROOT/pairs.jsonl"
timed $TS pairs "$ROOT/sft" --data "$ROOT/prompts.jsonl" --samples 4 --max-new-tokens 64 --chosen reference \
    --out "$ROOT/pairs-reference.jsonl"
timed $TS train bench/prefs/dpo.yaml "${FROM_SFT[@]}" data.train="$ROOT/pairs.jsonl" output.dir="$ROOT/dpo"
timed $TS train bench/prefs/dpo.yaml "${FROM_SFT[@]}" data.train="$ROOT/pairs-reference.jsonl" \
    output.dir="$ROOT/dpo-reference"
timed $TS train bench/prefs/grpo.yaml "${FROM_SFT[@]}" data.train="$ROOT/prompts.jsonl" \
    data.validation="$ROOT/prompts-validation.jsonl" output.dir="$ROOT/grpo"
# the control: SFT continued on the prompts' reference answers, as many steps as DPO takes
timed $TS train bench/prefs/sft.yaml "${FROM_SFT[@]}" data.train="$ROOT/references-sft.jsonl" train.lr=1.0e-4 \
    train.epochs=3 train.batch_size=4 eval.compare_base=false output.dir="$ROOT/sft-more"
.venv/bin/python bench/prefs_demo.py table "$ROOT" --runs sft,dpo,dpo-reference,grpo,sft-more
cat "$ROOT/times.txt"
