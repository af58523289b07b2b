#!/usr/bin/env bash
# Reproduce results/real-mars.md: the reference ladder and marsseg-best on real-mars.
#   results/run-real-mars.sh prepare            # shards from ../shared/data/real-mars/real_mars.npz
#   results/run-real-mars.sh train RECIPE...    # 5-fold train-folds at the CPU budget, resumable
#   FOLDS=0,1 results/run-real-mars.sh train RECIPE...   # only some folds
#   results/run-real-mars.sh score RECIPE...    # select (multi-member) or calibrate, evaluate OOF and gold, with and without TTA
# Every run is `marsseg-cli` from the make-installed .venv; seeds are the recipes' (seed = 0).
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=${CLI:-.venv/bin/marsseg-cli}
NPZ=${NPZ:-../shared/data/real-mars/real_mars.npz}
ROOT=${ROOT:-runs/real-mars}
EPOCHS=${EPOCHS:-8}           # the CPU budget: every member trains EPOCHS epochs per fold
FOLDS=${FOLDS:-}              # e.g. FOLDS=0,1 trains only those folds (default: all 5)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

cmd=${1:?usage: $0 prepare | train RECIPE... | score RECIPE...}; shift || true
case "$cmd" in
  prepare)
    [ -f "$ROOT/shards/dataset.json" ] || $CLI prepare --data "$NPZ" --out "$ROOT/shards"
    ;;
  train)
    for r in "$@"; do
      # Re-running resumes unfinished folds, so a run killed midway is simply retried.
      for attempt in 1 2 3; do
        /usr/bin/time -f "$r wall %e s" $CLI train-folds --data "$ROOT/shards" \
          --recipe "ensembles/$r.toml" --out "$ROOT/$r" --epochs "$EPOCHS" ${FOLDS:+--folds "$FOLDS"} --progress plain \
          && break
        echo "train-folds $r failed (attempt $attempt); resuming" >&2; sleep 5
      done
    done
    ;;
  score)
    for r in "$@"; do
      n=$(python3 -c "import json,sys;print(len(json.load(open(sys.argv[1]))['members']))" "$ROOT/$r/ensemble.json")
      # select fits the temperatures for the weights it picks; a single member is calibrated alone
      if [ "$n" -gt 1 ]; then $CLI select --run "$ROOT/$r"; else $CLI calibrate --run "$ROOT/$r"; fi
      # out-of-fold (every training crop by the fold that did not see it), kept aside,
      # then the gold crops (scores.json, what results/table.py reads)
      $CLI evaluate --ensemble "$ROOT/$r" --data "$ROOT/shards" --split train --tta
      cp "$ROOT/$r/scores.json" "$ROOT/$r/scores-oof.json"
      $CLI evaluate --ensemble "$ROOT/$r" --data "$ROOT/shards" --tta
    done
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
