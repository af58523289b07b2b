#!/usr/bin/env bash
# Issue 10 ablations on real-mars fold 0: seed-final (the plain loop's twin) with ONE key
# changed back to what marsseg did before, 30 epochs, training seed 0, split seed 0.
# Two runs at a time with 1 thread each (2 cores); every run's row is printed by bench.yardstick.
#   SHARDS=runs/real-mars/shards results/ablate-fold0.sh [NAME ...]
# (SHARDS: the real-mars shard folder, `results/run-real-mars.sh prepare` makes runs/real-mars/shards)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-runs/real-mars/shards}
ROOT=${ROOT:-$HOME/marsseg-runs/yard}
PY=${PY:-.venv/bin/python}
declare -A SET=(
  [abl-kaiming]='members.model.args.init="kaiming"'
  [abl-cutmix-sample]='members.augment.cutmix_mode="sample"'
  [abl-se8]='members.model.args.se_reduction=8'
  [abl-no-decay-norms]='members.optimizer.decay_norms=false'
  [abl-rock-target]='members.augment.rock_target=0.05'
  [abl-scale-input]='members.model.args.input_norm="scale"'
)
declare -A SET2=([abl-rock-target]='members.augment.rock_paste=0.0')
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(abl-kaiming abl-cutmix-sample abl-se8 abl-no-decay-norms)
run() {
  local n=$1; local extra=()
  [ -n "${SET2[$n]:-}" ] && extra=(--set "${SET2[$n]}")
  $PY -m bench.yardstick --data "$SHARDS" --recipe ensembles/seed-final.toml --fold 0 --epochs 30 \
    --seeds 0 --threads 1 --no-plain --root "$ROOT" --name "$n" --set "${SET[$n]}" "${extra[@]}"
}
for ((i = 0; i < ${#names[@]}; i += 2)); do
  run "${names[i]}" > "$ROOT/${names[i]}.out" 2>&1 &
  [ -n "${names[i+1]:-}" ] && run "${names[i+1]}" > "$ROOT/${names[i+1]}.out" 2>&1 &
  wait
done
