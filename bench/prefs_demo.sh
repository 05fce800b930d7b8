#!/usr/bin/env bash
# Preference and reward tuning on the demo task: a weak SFT model (100 tickets), then `pairs` + DPO and
# GRPO from it, all scored on the same 200 held-out tickets (README "Beyond imitation", docs/objectives.md).
# Prints the wall time of each step and the table. Usage: bash bench/prefs_demo.sh [runs/prefs]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/prefs}
TS=.venv/bin/tunesmith
timed() { local start=$SECONDS; "$@"; echo "[$(( SECONDS - start )) s] $*" | tee -a "$ROOT/times.txt"; }
mkdir -p "$ROOT" && : > "$ROOT/times.txt"
timed $TS train bench/prefs/sft.yaml output.dir="$ROOT/sft"
timed .venv/bin/python bench/prefs_demo.py prompts "$ROOT"
timed $TS pairs "$ROOT/sft" --data "$ROOT/prompts.jsonl" --samples 4 --max-new-tokens 64 --out "$ROOT/pairs.jsonl"
timed $TS train bench/prefs/dpo.yaml model="$ROOT/sft" data.train="$ROOT/pairs.jsonl" \
    data.test="$ROOT/sft/data/test.jsonl" output.dir="$ROOT/dpo"
timed $TS train bench/prefs/dpo.yaml model="$ROOT/sft" data.train="$ROOT/pairs.jsonl" \
    data.test="$ROOT/sft/data/test.jsonl" output.dir="$ROOT/dpo-lr5e-5" train.lr=5.0e-5
timed $TS train bench/prefs/grpo.yaml model="$ROOT/sft" data.train="$ROOT/prompts.jsonl" \
    data.validation="$ROOT/prompts-validation.jsonl" data.test="$ROOT/sft/data/test.jsonl" output.dir="$ROOT/grpo"
.venv/bin/python bench/prefs_demo.py table "$ROOT" --runs sft,dpo,dpo-lr5e-5,grpo
cat "$ROOT/times.txt"
