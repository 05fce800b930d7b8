#!/usr/bin/env bash
# The speed bench (bench/train_speed.py) of an earlier revision and of this tree: "CPU speed does not
# regress" means tunesmith's tokens/s ratio to TRL stays within 5% of the earlier revision's, measured
# in one session on one machine.
#
#   bench/speed_vs_revision.sh 928f8a1                 # each tree's bench back to back: tunesmith and trl-fp32, seed 0
#   RUNS=tunesmith,trl-best SEEDS=0,1 bench/speed_vs_revision.sh 928f8a1
#   REPEAT=3 bench/speed_vs_revision.sh 928f8a1        # interleaved: tunesmith old, new, old, new, ... then one TRL run
#   REPEAT=3 TRL_RUN=trl-defaults bench/speed_vs_revision.sh 928f8a1   # on a CPU with fast bf16: TRL in bf16 autocast
#   REPEAT=3 TRL_RUN=none bench/speed_vs_revision.sh 184658f           # the two trees alone, no TRL run
#
# The machine's speed drifts between invocations (a TRL run identical in both trees was 20% faster
# in the second, 2026-12-02), so with REPEAT the two trees' tunesmith runs alternate, REPEAT times
# each, and both are divided by the same TRL run (trl-fp32, from this tree) at the end: the ratio of
# the two ratios is then the two trees' own speeds, measured side by side.
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
repeat=${REPEAT:-0}
examples=${TRAIN_EXAMPLES:-96}
trl_run=${TRL_RUN:-trl-fp32}  # the TRL run both trees are divided by (none: no TRL run)
# Beside this checkout, so that its bench finds ../shared/datasets/medquad as this one does.
old="$(cd .. && pwd)/.tunesmith-rev-$rev"
git worktree add -q --detach "$old" "$rev"
trap 'git worktree remove --force "$old"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
bench() {  # tree, runs: one invocation of that tree's bench, its table on stdout
    PYTHONPATH="$1/src" .venv/bin/python "$1/bench/train_speed.py" --runs "$2" --seeds "$seeds" \
        --eval-examples 16 --train-examples "$examples"
}
if [ "$repeat" -eq 0 ]; then
    for tree in "$old" "$PWD"; do
        echo "== $(git -C "$tree" log -1 --format='%h %cd' --date=iso)"
        bench "$tree" "$runs"
    done
    exit 0
fi
log=$(mktemp)
# One training run of a tree's bench child (no matmul peak, no eval: those cost minutes here), its tokens/s.
one() {  # tree, run
    PYTHONPATH="$1/src" .venv/bin/python - "$1" "$2" "$examples" <<'PY'
import argparse, importlib.util, json, sys, tempfile
from pathlib import Path
tree, run, examples = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("train_speed", f"{tree}/bench/train_speed.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
args = argparse.Namespace(batch=4, accum=2, lr=2e-4, warmup=2)
with tempfile.TemporaryDirectory() as name:
    tmp = Path(name)
    (tmp / "data.json").write_text(json.dumps(bench.write_data(tmp, examples, 16, 0)))
    print(f"{bench.spawn(args, run, tmp, run)['tokens_per_second']:.1f}")
PY
}
for round in $(seq "$repeat"); do
    # odd rounds the earlier tree first, even rounds this one: a slot that runs slower counts against both
    order=$([ $((round % 2)) -eq 1 ] && echo "$old $PWD" || echo "$PWD $old")
    for tree in $order; do
        name=$([ "$tree" = "$old" ] && echo before || echo after)
        echo "round $round $name $(git -C "$tree" log -1 --format=%h) tunesmith $(one "$tree" tunesmith) tokens/s" | tee -a "$log"
    done
done
if [ "$trl_run" = none ]; then  # the two trees alone
    awk '{sum[$3] += $6; n[$3]++} END {b = sum["before"] / n["before"]; a = sum["after"] / n["after"];
         printf "before %.1f tokens/s, after %.1f: after/before %+.1f%%\n", b, a, 100 * (a / b - 1)}' "$log"
    exit 0
fi
trl=$(one "$PWD" "$trl_run")
echo "$trl_run $trl tokens/s"
awk -v trl="$trl" '{sum[$3] += $6; n[$3]++}
    END {b = sum["before"] / n["before"]; a = sum["after"] / n["after"];
         printf "before %.1f tokens/s (ratio to TRL %.2fx), after %.1f (%.2fx): after/before %+.1f%%\n",
                b, b / trl, a, a / trl, 100 * (a / b - 1)}' "$log"
