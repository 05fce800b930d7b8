#!/usr/bin/env bash
# The speed bench (bench/train_speed.py) of an earlier revision and of this tree, back to back, each
# against the same TRL run: "CPU speed does not regress" means tunesmith's tokens/s ratio to TRL stays
# within 5% of the earlier revision's, measured in one session on one machine.
#
#   bench/speed_vs_revision.sh 928f8a1                 # tunesmith and trl-fp32, seed 0, both trees
#   RUNS=tunesmith,trl-best SEEDS=0,1 bench/speed_vs_revision.sh 928f8a1
#
# trl-fp32 is the default reference because on a CPU without fast bf16 (no AVX512-BF16 or AMX)
# tunesmith trains in fp32 too; TRL's bf16 runs would then measure bf16 emulation, not the stacks.
# The earlier tree runs from a temporary git worktree beside this one, imported through PYTHONPATH with this
# environment's libraries. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/speed_vs_revision.sh REVISION}
runs=${RUNS:-tunesmith,trl-fp32}
seeds=${SEEDS:-0}
# Beside this checkout, so that its bench finds ../shared/datasets/medquad as this one does.
old="$(cd .. && pwd)/.tunesmith-rev-$rev"
git worktree add -q --detach "$old" "$rev"
trap 'git worktree remove --force "$old"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for tree in "$old" "$PWD"; do
    echo "== $(git -C "$tree" log -1 --format='%h %cd' --date=iso)"
    PYTHONPATH="$tree/src" .venv/bin/python "$tree/bench/train_speed.py" --runs "$runs" --seeds "$seeds" \
        --eval-examples 16
done
