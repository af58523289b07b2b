"""distill: one student network taught by a k-fold teacher ensemble, in an ordinary run folder.

Steps (each checked before anything is written, each resumable):

1. The teacher's targets (`teacher.write_targets`) are computed once into the student's
   ``targets.h5``: out-of-fold probabilities of the labeled images, TTA probabilities of
   the unlabeled (test) images twice: by the teacher's fold-0 models (they teach the fold-0
   student: the other folds' models saw its held-out images) and by the whole ensemble
   (they teach the --all student). A rerun with another teacher or other data is refused.
2. The student (`student.load_student`: one member, default the teacher's strongest
   architecture) trains on the teacher's fold 0 training part with `train.train_one_fold`
   and the targets streamed from the file (`teaching`); the teacher's fold 0 validation
   part, whose targets are out-of-fold, picks the epoch. No test mask is read.
3. ``--all``: a second student trains on every labeled image for the chosen epoch count
   (fold "all"); it is then the run's model.

The student's run folder is a run folder like train-folds writes (recipe, data record,
splits, ``<member>/fold_<k>/``, ensemble file with one member and one model), plus the
targets file and ``distilled_from`` in the ensemble file, so predict, evaluate, report
and every backend use it unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import atomic_path, write_json_atomic
from .checkpoint import check_state
from .config import Recipe, with_epochs
from .device import Resolved
from .errors import InputError
from .folds import ALL, fold_rows, load_train
from .records import Done, EnsembleSpec, FoldSpec, MemberSpec
from .runfolder import RunFolder, data_fingerprint, fold_name
from .student import DistillConfig, load_student
from .teacher import Teacher, fold_models, open_teacher, write_targets
from .teaching import TARGETS, Teaching, check_record, read_record

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "ensembles" / "student.toml"


@dataclass(frozen=True)
class DistillOptions:
    """How to run (not what to learn): device, budget, display."""

    precision: str = "auto"  # auto | bf16 | fp16 | no
    threads: int | None = None
    unlabeled: str | None = None  # test | none; None: test when the data has test images
    epochs: int | None = None  # replaces the member's epochs
    time_budget: float | None = None  # wall seconds for the selection run (budget.py)
    all: bool = False  # then retrain on every labeled image for the chosen epoch count
    progress: str = "auto"  # auto | live | plain | none

    def check(self) -> None:
        if self.epochs is not None and self.time_budget is not None:
            raise InputError("--epochs and --time-budget both set the epoch count; give one")
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {self.epochs}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise InputError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.unlabeled not in (None, "test", "none"):
            raise InputError(f"--unlabeled: unknown value {self.unlabeled!r} (test, none)")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.progress not in ("auto", "live", "plain", "none"):
            raise InputError(f"--progress: unknown value {self.progress!r} (auto, live, plain, none)")

    def pins(self, unlabeled: str) -> dict:
        """What a student run folder keeps from its first command (a rerun must match)."""
        return {"epochs": self.epochs, "time_budget_s": self.time_budget, "all": self.all,
                "unlabeled": unlabeled}


@dataclass(frozen=True)
class _Plan:
    """Everything the checks resolved, before anything is written."""

    teacher: Teacher
    recipe: Recipe
    distill: DistillConfig
    unlabeled: str
    rt: Resolved  # device and precision of the teacher's forward and the student's training
    fp: dict
    dataset_sha256: str


def _unlabeled(data: Path, asked: str | None) -> str:
    from .data import count_images

    n = count_images(data, "test")
    if asked is None:
        return "test" if n else "none"
    if asked == "test" and n == 0:
        raise InputError(f"{data}: the test split holds no images; use --unlabeled none")
    return asked


def _check_pins(run: RunFolder, recipe_path: Path, pins: dict) -> bool:
    """Refuse a student run folder made with another recipe or other options. True when the
    one change is `--all` added to a run made without it (its fold 0 is reused as it is)."""
    if not run.recipe.exists():
        return False
    old = {**run.read_overrides(), "teacher": None}
    new = {**pins, "teacher": None}
    adds_all = new["all"] and old.get("all") is False and {**old, "all": True} == new
    if run.recipe.read_text() != recipe_path.read_text() or (old != new and not adds_all):
        raise InputError(f"{run.recipe}: this student run folder was made with another "
                         f"recipe than {recipe_path} or other --epochs, --time-budget, --all "
                         "or --unlabeled; use a new --out (or the ones it was made with; "
                         "--all may be added later)")
    return adds_all


def _check_run(run: RunFolder, plan: _Plan, recipe_path: Path, pins: dict) -> None:
    """Refuse a student run folder made with another recipe, options, teacher or data."""
    run.check_target()
    run.check_data(plan.fp)
    _check_pins(run, recipe_path, pins)
    if (run.path / TARGETS).exists():
        check_record(run.path / TARGETS, plan.teacher.sha256, plan.dataset_sha256, plan.unlabeled)
    for fold in (0, ALL):
        if run.verify_fold(plan.recipe.members[0].name, fold) is None:
            name = plan.recipe.members[0].name
            check_state(run.fold_dir(name, fold), fold_name(name, fold))


def _plan(teacher: Path, data: Path, recipe_path: Path, opts: DistillOptions, split) -> _Plan:
    from ._io import sha256_file
    from .device import resolve

    fp = data_fingerprint(data)  # verifies the train shards
    t = open_teacher(teacher, fp)
    recipe, dcfg = load_student(recipe_path, t.strongest_model())
    recipe = with_epochs(recipe, opts.epochs)
    # the teacher's folds and split: its fold 0 validation part picks the student's epoch
    recipe = dataclasses.replace(recipe, folds=int(t.splits["k"]),
                                 split_seed=int(t.splits["seed"]))
    fold_rows(split, t.splits, 0, recipe.members[0])  # filters that leave nothing to train
    unlabeled = _unlabeled(data, opts.unlabeled)
    if unlabeled != "none":
        fold_models(t, 0, "the fold 0 student's unlabeled images are taught by the teacher's "
                          "fold 0 models only, the others saw its held-out images (train the "
                          "teacher's fold 0, or use --unlabeled none)")
    return _Plan(t, recipe, dcfg, unlabeled, resolve(None, opts.precision), fp,
                 sha256_file(data / "dataset.json"))


def _start(run: RunFolder, plan: _Plan, recipe_path: Path, pins: dict) -> None:
    """The shared files of a new student run folder (under its lock; another process may
    have written them since the checks, so they are checked again)."""
    run.check_writable()
    adds_all = _check_pins(run, recipe_path, pins)
    run.check_data(plan.fp)
    if adds_all:  # the selection run is kept; its options now say --all
        write_json_atomic(run.overrides, {**run.read_overrides(), "all": True})
    if not run.recipe.exists():
        write_json_atomic(run.overrides, {**pins, "teacher": str(plan.teacher.run.path)})
        with atomic_path(run.recipe) as tmp:
            shutil.copyfile(recipe_path, tmp)
    if run.read_data() is None:
        run.write_data(plan.fp)
    if run.read_splits() is None:
        run.write_splits(plan.teacher.splits)


def _heldout(split, splits: dict, targets: Path, student: Done) -> dict:
    """The student's and the teacher's (out-of-fold) mIoU on the teacher's fold 0
    validation part (no TTA either)."""
    import h5py

    from .metrics import class_iou, confusion_matrix, course_miou, labeled_argmax, round_score

    pos = {int(i): p for p, i in enumerate(split.ids)}
    rows = np.sort([pos[int(i)] for i in splits["folds"][0]["val_ids"]])
    cm = np.zeros((5, 5), np.int64)
    with h5py.File(targets, "r") as f:
        has = f["labeled/has"][()][rows]
        for s in range(0, len(rows), 64):
            r = rows[s:s + 64][has[s:s + 64]]
            if len(r):
                cm += confusion_matrix(labeled_argmax(f["labeled/probs"][r]), split.masks[r])
    teacher = round_score(course_miou(cm)) if has.any() else None
    return {"fold": 0, "images": int(len(rows)), "student_miou": student.val_miou,
            "student_iou": None if student.val_iou is None else list(student.val_iou), "teacher_oof_miou": teacher,
            "teacher_oof_iou": [round_score(v) for v in class_iou(cm)] if has.any() else None}


def _ensemble(run: RunFolder, plan: _Plan, data: Path, done0: Done, done_all: Done | None,
              split) -> EnsembleSpec:
    """The student's ensemble file: one member, one model, plus distilled_from and heldout."""
    m = plan.recipe.members[0]
    rec = read_record(run.path / TARGETS)
    done = done_all or done0
    k = int(plan.teacher.splits["k"])
    # trained_on "all": no held-out images, its fold number is none of the splits'
    entry = FoldSpec(k if done_all else 0, fold_name(m.name, ALL if done_all else 0),
                     done.sha256, done.val_miou, done.best_epoch, done.epochs, done.epochs_run,
                     "all" if done_all else None)
    heldout = _heldout(split, plan.teacher.splits, run.path / TARGETS, done0)
    score = None if done_all else heldout["student_miou"]
    iou = None if done_all or heldout["student_iou"] is None else tuple(heldout["student_iou"])
    return EnsembleSpec(
        name=run.path.name, recipe=plan.recipe.name, k=k, seed=plan.recipe.seed, data=str(data),
        members=(MemberSpec(m.name, 1.0, (entry,), score, iou),),
        oof_miou_ensemble=score, oof_iou_ensemble=iou, selected=(m.name,),
        distilled_from={"run": rec.teacher, "sha256": rec.teacher_sha256,
                        "oof_miou": rec.teacher_oof_miou, "unlabeled": rec.unlabeled,
                        "n_labeled": rec.n_labeled, "n_without_target": rec.n_without_target,
                        "n_unlabeled": rec.n_unlabeled,
                        "distill": dataclasses.asdict(plan.distill)},
        heldout=heldout)


def distill(teacher: str | Path, data: str | Path, out: str | Path,
            recipe: str | Path = DEFAULT_RECIPE, options: DistillOptions = DistillOptions(),
            *, console=None) -> dict:
    """Teach one student network from the teacher run folder `teacher` on `data` into the run
    folder `out`; returns its ensemble file's dict (plus "trained" and "seconds").

    Every check (options, teacher, data, recipe, an `out` made otherwise) runs before
    anything is written. A rerun resumes: finished folds are skipped, an interrupted one
    continues after its last saved epoch, stored targets are reused.
    """
    from rich.console import Console

    t0 = time.perf_counter()
    console = console or Console()
    options.check()
    teacher, data, out = Path(teacher), Path(data).resolve(), Path(out).resolve()
    recipe_path = Path(recipe)
    split = load_train(data)  # first: what is wrong inside a shard is the clearer message
    plan = _plan(teacher, data, recipe_path, options, split)
    run = RunFolder(out)
    pins = options.pins(plan.unlabeled)
    _check_run(run, plan, recipe_path, pins)
    m = plan.recipe.members[0]
    folds = [0, ALL] if options.all else [0]
    with contextlib.ExitStack() as held:
        with run.lock():
            _start(run, plan, recipe_path, pins)
            jobs = [f for f in folds if run.read_done(m.name, f) is None]
            held.enter_context(run.lock_folds([(m.name, f) for f in jobs]))
        say = (lambda s: None) if options.progress == "none" else console.print
        _targets(run, plan, data, split, say)
        done0, done_all = _train(run, plan, split, options, jobs, console)
        with run.lock():
            ens = _ensemble(run, plan, data, done0, done_all, split)
            run.write_ensemble(ens)
    if options.progress != "none":
        from ._progress import pct

        h = ens.heldout
        console.print(f"student {m.name!r}: held-out mIoU {pct(h['student_miou'])} (teacher OOF "
                      f"{pct(h['teacher_oof_miou'])}, {h['images']} images of the teacher's "
                      f"fold 0); {ens.distilled_from['n_without_target']} labeled image(s) "
                      f"without a teacher target (hard labels only); {run.ensemble}",
                      highlight=False)
    return {**ens.to_json(), "trained": [fold_name(m.name, f) for f in jobs],
            "seconds": round(time.perf_counter() - t0, 3)}


def _targets(run: RunFolder, plan: _Plan, data: Path, split, say) -> None:
    path = run.path / TARGETS
    if path.exists():
        check_record(path, plan.teacher.sha256, plan.dataset_sha256, plan.unlabeled)
        return
    t = time.perf_counter()
    rec = write_targets(plan.teacher, data, split, path, unlabeled=plan.unlabeled,
                        rt=plan.rt, dataset_sha256=plan.dataset_sha256, log=say)
    say(f"targets -> {path}: {rec.n_labeled - rec.n_without_target} labeled (out-of-fold), "
        f"{rec.n_without_target} without, {rec.n_unlabeled} unlabeled "
        f"({time.perf_counter() - t:.1f} s)")


def _train(run: RunFolder, plan: _Plan, split, opts: DistillOptions, jobs, console):
    """Fold 0 (the epoch chosen on the held-out part), then with --all fold "all"."""
    from ._progress import ProgressView
    from .budget import fit_member
    from .train import train_one_fold

    m = plan.recipe.members[0]
    teaching = Teaching(run.path / TARGETS, plan.distill)
    kw = {"rt": plan.rt, "threads": opts.threads, "teaching": teaching}
    view = ProgressView([(m.name, f, 0 if opts.time_budget else m.epochs) for f in jobs],
                        mode=opts.progress, console=console)
    with view:
        def progress(ev):
            view.update([ev])

        done0 = train_one_fold(plan.recipe, m, 0, split, run.path, progress=progress,
                               time_budget=opts.time_budget, **kw)
        if not opts.all:
            return done0, None
        chosen = fit_member(m, done0.best_epoch + 1)
        done_all = train_one_fold(dataclasses.replace(plan.recipe, members=(chosen,)), chosen,
                                  ALL, split, run.path, progress=progress, **kw)
    return done0, done_all
