#!/usr/bin/env bash
# Reproduce results/real-mars.md: the reference ladder and marsseg-best on real-mars.
#   results/run-real-mars.sh prepare            # shards from ../shared/data/real-mars/real_mars.npz
#   results/run-real-mars.sh train RECIPE...    # 5-fold train-folds at the CPU budget, resumable
#   FOLDS=0,1 results/run-real-mars.sh train RECIPE...   # only some folds
#   results/run-real-mars.sh score RECIPE...    # select (multi-member) or calibrate, evaluate OOF and gold, with and without TTA
#   results/run-real-mars.sh oof RECIPE...      # OOF only (issue 18's levers: chosen by OOF, gold once at the end)
#   FOLDS=0,1,2 EPOCHS=40 results/run-real-mars.sh train lever-sample   # a round-2 lever, 3 folds
#   FOLDS=0,1,2 results/run-real-mars.sh oof lever-e40 lever-sample     # -> scores-oof-f012.json
#   FOLDS=0,1,2 .venv/bin/python results/table.py round2 lever-e40 lever-sample
#   FOLDS=0,1,2 EPOCHS=40 results/run-real-mars.sh lanes lever-e40 lever-lovasz lever-e40:pseudo
#     the same trainings as `train`, as single-fold jobs in LANES (2) lanes of one torch
#     thread each (no core idles while an odd fold trains alone); RECIPE:pseudo trains
#     RECIPE with `--teacher $ROOT/$TEACHER` into the run RECIPE-pseudo (issue 18, lever 4)
#   EPOCHS=40 results/run-real-mars.sh lanes lever-e40@3,4 lever-lovasz@0 lever-e40:pseudo@3,4
#     RECIPE@F,G: those folds of RECIPE, queued in the order given (instead of FOLDS)
#   REUSE=lever-e40,marsseg-best EPOCHS= results/run-real-mars.sh lanes marsseg-r2
#     adopts the finished folds of those runs that are exactly what the recipe would train
#     (train-folds --reuse: same data, splits, seed, member block, precision), trains the rest
#   MEMBERS=res-ds-dice FOLDS=0,1,2 results/run-real-mars.sh oof marsseg-best
#     -> scores-oof-f012-res-ds-dice.json (one member of a run; table.py: marsseg-best/res-ds-dice)
#   EPOCHS=30 results/run-real-mars.sh distill none test   # issue 17: students of $TEACHER
#     (student-none, student-test; resumable), each scored on the held-out slice (the
#     teacher's fold 0 validation part), then gold +TTA; the teacher on the same slice too
#   EPOCHS=30 results/run-real-mars.sh distill none:student-t4   # an ablation recipe
#     (ensembles/student-t4.toml) -> student-none-student-t4
# EPOCHS= (empty) trains the recipes' own epochs. FOLDS also restricts oof/score to those
# folds, and names the kept OOF file scores-oof-f<folds>.json (scores-oof.json without FOLDS).
# Every run is `marsseg-cli` from the make-installed .venv; seeds are the recipes' (seed = 0).
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=${CLI:-.venv/bin/marsseg-cli}
NPZ=${NPZ:-../shared/data/real-mars/real_mars.npz}
ROOT=${ROOT:-runs/real-mars}
EPOCHS=${EPOCHS-8}            # the CPU budget: every member trains EPOCHS epochs per fold
FOLDS=${FOLDS:-}              # e.g. FOLDS=0,1 trains (and scores) only those folds (default: all 5)
RECIPES=${RECIPES:-ensembles} # where RECIPE.toml is read
BACKEND=${BACKEND:-auto}      # evaluate's --backend (auto: openvino on a CPU)
TEACHER=${TEACHER:-marsseg-best}  # distill's and RECIPE:pseudo's teacher run (under ROOT)
MEMBERS=${MEMBERS:-}          # oof: only these members (comma-separated; default: the selected)
LANES=${LANES:-2}             # lanes: single-fold jobs at once
REUSE=${REUSE:-}              # train/lanes: runs under ROOT whose identical finished folds are
                              # adopted, not trained (train-folds --reuse), e.g. REUSE=lever-e40
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

# evaluate --tta RECIPE with more options; the scores it writes are kept aside as NAME
# (evaluate always writes scores.json, which results/table.py reads as the gold scores):
# the gold scores.json a run already has is set aside meanwhile and put back.
aside() {
  local r=$1 name=$2; shift 2; local gold="$ROOT/$r/scores.json"
  [ ! -f "$gold" ] || mv "$gold" "$gold.gold"
  $CLI evaluate --ensemble "$ROOT/$r" --data "$ROOT/shards" --tta --backend "$BACKEND" "$@" \
    || { [ ! -f "$gold.gold" ] || mv "$gold.gold" "$gold"; return 1; }
  mv "$gold" "$ROOT/$r/$name"
  [ ! -f "$gold.gold" ] || mv "$gold.gold" "$gold"
  echo "kept aside: $ROOT/$r/$name"
}

# Out-of-fold scores under a name that says which folds (and members, with MEMBERS) they cover.
oof() {
  aside "$1" "scores-oof${FOLDS:+-f${FOLDS//,/}}${MEMBERS:+-${MEMBERS//,/-}}.json" --split train \
    ${FOLDS:+--folds "$FOLDS"} ${MEMBERS:+--members "$MEMBERS"}
}

# REUSE=a,b -> --reuse $ROOT/a,$ROOT/b
reuse_opt() {
  local r out=
  for r in ${REUSE//,/ }; do out+="${out:+,}$ROOT/$r"; done
  [ -z "$out" ] || echo "--reuse $out"
}

# lanes' RECIPE[:pseudo][@F,G] -> the folds it queues (F,G; default FOLDS, else all 5)
arg_folds() {
  case "$1" in *@*) echo "${1#*@}" ;; *) echo "${FOLDS:-0,1,2,3,4}" ;; esac
}

# RECIPE:pseudo -> the train-folds option that adds the teacher's pseudo-labelled test images
teacher_opt() {
  case "$1" in
    *:pseudo) echo "--teacher $ROOT/$TEACHER" ;;
    *:*) echo "unknown variant in $1 (RECIPE or RECIPE:pseudo)" >&2; return 2 ;;
  esac
}

cmd=${1:?usage: $0 prepare | train RECIPE... | lanes RECIPE[:pseudo]... | oof RECIPE... | score RECIPE... | distill none|test...}; shift || true
case "$cmd" in
  prepare)
    [ -f "$ROOT/shards/dataset.json" ] || $CLI prepare --data "$NPZ" --out "$ROOT/shards"
    ;;
  train)
    for r in "$@"; do
      # Re-running resumes unfinished folds, so a run killed midway is simply retried.
      ok=
      for attempt in 1 2 3; do
        /usr/bin/time -f "$r wall %e s" $CLI train-folds --data "$ROOT/shards" \
          --recipe "$RECIPES/$r.toml" --out "$ROOT/$r" ${EPOCHS:+--epochs "$EPOCHS"} ${FOLDS:+--folds "$FOLDS"} --progress plain \
          $(reuse_opt) && { ok=1; break; }
        echo "train-folds $r failed (attempt $attempt); resuming" >&2; sleep 5
      done
      [ -n "$ok" ] || { echo "train-folds $r failed 3 times" >&2; exit 1; }
    done
    ;;
  lanes)
    for arg in "$@"; do teacher_opt "${arg%%@*}" > /dev/null || exit 2; done
    # One job per (RECIPE, fold), popped in order by LANES lanes; each is a resumable
    # single-fold train-folds in its own process (--sequential: no Ray), so a rerun resumes.
    # RECIPE@3,4 queues those folds of RECIPE (instead of FOLDS) at that place in the order.
    q=$(mktemp -d); trap 'rm -rf "$q"' EXIT
    for arg in "$@"; do
      for f in $(seq -s ' ' 0 4); do
        case ",$(arg_folds "$arg")," in *",$f,"*) echo "${arg%%@*} $f" >> "$q/jobs" ;; esac
      done
    done
    lane() {
      local job arg f r out
      while job=$(flock "$q/jobs" bash -c 'j=$(head -n 1 "$1"); [ -z "$j" ] || sed -i 1d "$1"; echo "$j"' _ "$q/jobs") && [ -n "$job" ]; do
        arg=${job% *} f=${job##* } r=${arg%%:*}; out=$r; [ "$r" = "$arg" ] || out=$r-${arg#*:}
        echo "lane $1: $out fold $f" >&2
        for attempt in 1 2 3; do
          /usr/bin/time -f "$out fold $f wall %e s" $CLI train-folds --data "$ROOT/shards" \
            --recipe "$RECIPES/$r.toml" --out "$ROOT/$out" ${EPOCHS:+--epochs "$EPOCHS"} --folds "$f" \
            --sequential --threads 1 --progress plain $(teacher_opt "$arg") $(reuse_opt) && continue 2
          echo "$out fold $f failed (attempt $attempt); resuming" >&2; sleep 5
        done
        echo "$out fold $f failed 3 times" >&2; return 1
      done
    }
    pids=(); for l in $(seq "$LANES"); do lane "$l" & pids+=($!); done
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [ "$rc" = 0 ] || exit 1
    for arg in "$@"; do  # every fold done: one pass writes the run's ensemble.json
      folds=$(arg_folds "$arg"); arg=${arg%%@*}
      r=${arg%%:*}; out=$r; [ "$r" = "$arg" ] || out=$r-${arg#*:}
      $CLI train-folds --data "$ROOT/shards" --recipe "$RECIPES/$r.toml" --out "$ROOT/$out" \
        ${EPOCHS:+--epochs "$EPOCHS"} --folds "$folds" --sequential --progress plain $(teacher_opt "$arg") $(reuse_opt)
    done
    ;;
  oof)
    for r in "$@"; do oof "$r"; done
    ;;
  score)
    for r in "$@"; do
      n=$(python3 -c "import json,sys;print(len(json.load(open(sys.argv[1]))['members']))" "$ROOT/$r/ensemble.json")
      # select fits the temperatures for the weights it picks; a single member is calibrated alone
      if [ "$n" -gt 1 ]; then $CLI select --run "$ROOT/$r"; else $CLI calibrate --run "$ROOT/$r"; fi
      # out-of-fold (every training crop by the fold that did not see it), kept aside,
      # then the gold crops (scores.json, what results/table.py reads)
      oof "$r"
      $CLI evaluate --ensemble "$ROOT/$r" --data "$ROOT/shards" --tta --backend "$BACKEND" ${FOLDS:+--folds "$FOLDS"}
    done
    ;;
  distill)
    FOLDS=0 oof "$TEACHER"   # the teacher's out-of-fold score on the slice -> scores-oof-f0.json
    # the fold 0 models alone on gold: the teacher each slice image's target came from
    aside "$TEACHER" scores-gold-f0.json --folds 0
    for arg in "$@"; do
      # none | test, or none:RECIPE (an ablation recipe in $RECIPES -> run student-none-RECIPE)
      u=${arg%%:*} rec=${arg#*:}; [ "$rec" != "$arg" ] || rec=
      s="student-$u${rec:+-$rec}"
      $CLI distill --ensemble "$ROOT/$TEACHER" --data "$ROOT/shards" --out "$ROOT/$s" \
        --unlabeled "$u" ${EPOCHS:+--epochs "$EPOCHS"} ${rec:+--recipe "$RECIPES/$rec.toml"}
      FOLDS= oof "$s"         # its fold 0 validation part: the held-out slice
      $CLI evaluate --ensemble "$ROOT/$s" --data "$ROOT/shards" --tta --backend "$BACKEND"
    done
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
