"""train-folds: every (member, fold) of a recipe as one Ray task, then out-of-fold scores.

Ray stays at this edge: each task only calls `train.train_one_fold`, which runs
the same without Ray (`sequential=True`, tests, debugging). The run folder
(`runfolder.RunFolder`) holds a copy of the recipe, the data record, the splits
(written once, before any task starts), one folder per member and fold, and the
ensemble file.

Everything a user can get wrong is checked before anything is written or Ray
starts. Then, under the run folder's lock, the shared files are written and the
folds to train are locked; the ensemble file is collected under the lock again.
Re-running the same command skips finished folds (their weights checked against
their sha256) and resumes the others from their ``state/``; a task whose worker
dies is retried by Ray (`max_retries`) and resumes the same way. Before any is dispatched,
folds that --reuse run folders finished alike are adopted instead (`reuse`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ._io import atomic_path, sha256_file, write_json_atomic
from .checkpoint import check_state, check_workers, read_trainer
from .cluster import check_address
from .config import Recipe, load_recipe, parse_recipe, with_epochs
from .confine import check_apart
from .data import count_images, open_data, reads_data
from .dataparallel import check_batch
from .device import Resolved, resolve_training
from .errors import InputError, RunError
from .folds import fold_rows, load_train, plan_splits
from .oof import collect, same_folds, summary_table
from .raytrain import check_fits, check_options, fold_slots, submitter
from .records import Done
from .reuse import Wanted, adopt, open_sources
from .runfolder import STATE, TRAINER_STATE, RunFolder, data_fingerprint, fold_name
from .teacher import check_splits, fold_models, open_teacher, write_pseudo_labels
from .teaching import TARGETS, check_record
from .tracking import TrackingSpec, check_trackers, open_group
from .train import train_one_fold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to learn): devices, parallelism, selection, display."""

    precision: str = "auto"  # auto | bf16 | fp16 | no
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0  # fractional values share one GPU between tasks
    threads: int | None = None  # torch threads per task; default max(1, int(cpus_per_task))
    address: str | None = None  # join this Ray cluster; None = embedded local Ray
    sequential: bool = False  # run in this process, one fold after another, no Ray
    members: tuple[str, ...] | None = None  # subset of member names (None = all)
    folds: tuple[int, ...] | None = None  # subset of folds (None = all)
    max_retries: int = 3  # Ray retries of a task whose worker process died
    progress: str = "auto"  # auto (live on a terminal, plain lines otherwise) | live | plain | none
    time_budget: float | None = None  # wall seconds per fold; sets each fold's epochs (budget.py)
    workers_per_fold: int = 1  # > 1: data-parallel processes per fold on Ray Train (raytrain.py)
    teacher: str | None = None  # a run folder whose per-fold TTA pseudo-labels of the test images train too
    reuse: tuple[str, ...] = ()  # run folders whose provably identical finished folds are adopted
    log_with: tuple[str, ...] = ()  # accelerate trackers (tracking.py): tensorboard, mlflow, ...
    tracking: TrackingSpec | None = None  # resolved from log_with by train_folds, not by users

    def check(self) -> None:
        if self.cpus_per_task <= 0:
            raise InputError(f"--cpus-per-task must be > 0, got {self.cpus_per_task}")
        if self.gpus_per_task < 0:
            raise InputError(f"--gpus-per-task must be >= 0, got {self.gpus_per_task}")
        check_options(self)
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.max_retries < 0:
            raise InputError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.progress not in ("auto", "live", "plain", "none"):
            raise InputError(f"--progress: unknown value {self.progress!r} (auto, live, plain, none)")
        if self.time_budget is not None and not self.time_budget > 0:
            raise InputError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        check_trackers(self.log_with)  # a missing package fails here, before anything starts

    def resources(self) -> dict:
        """How the folds run, as tracked hyperparameters."""
        return {"cpus_per_task": self.cpus_per_task, "gpus_per_task": self.gpus_per_task,
                "threads": self.threads or "auto", "sequential": self.sequential,
                "address": self.address or "local"}

    def resolve(self) -> Resolved:
        """Device and precision of every fold, decided once here (`device.resolve_training`)
        and handed to each fold task."""
        return resolve_training(self.precision, None if self.sequential else self.gpus_per_task)


def _select(recipe: Recipe, opts: RunOptions) -> list[tuple[str, int]]:
    names = [m.name for m in recipe.members]
    members = list(opts.members) if opts.members else names
    for name in members:
        if name not in names:
            raise InputError(f"--members: recipe {recipe.name!r} has no member {name!r} "
                             f"(members: {', '.join(names)})")
    folds = list(opts.folds) if opts.folds is not None else list(range(recipe.folds))
    for f in folds:
        if not 0 <= f < recipe.folds:
            raise InputError(f"--folds: fold {f} is out of range 0..{recipe.folds - 1}")
    return [(m, f) for m in members for f in sorted(set(folds))]


def _check_recipe(run: RunFolder, recipe: Recipe, time_budget: float | None,
                  teacher: str | None = None) -> None:
    """Refuse a run folder made with another recipe, --epochs, --time-budget or --teacher.
    (Each fold keeps the epochs a time budget gave it in its own budget file.)"""
    if not run.recipe.exists():
        return
    import tomllib

    try:
        old = parse_recipe(tomllib.loads(run.recipe.read_text()), name=recipe.name,
                           source=str(run.recipe), check_models=False)
        pinned = run.read_overrides()
        if old is not None:
            old = with_epochs(old, pinned.get("epochs"))
        if pinned.get("time_budget_s") != time_budget or pinned.get("teacher") != teacher:
            old = None
    except (InputError, tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
        old = None
    if old != recipe:
        raise InputError(f"{run.recipe}: this run folder was made with a different recipe, "
                         f"--epochs, --time-budget or --teacher; use a new --out (or the ones "
                         f"it was made with)")


def _check_resources(opts: RunOptions) -> None:
    """The embedded Ray gets this machine's CPUs and GPUs: refuse a task that could never run."""
    if opts.sequential or opts.address:
        return  # a cluster's resources are checked once joined (_run_ray)
    import torch

    check_fits(opts, {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()},
                "this machine")


def _validate(recipe: Recipe, selected, data: Path, run: RunFolder, opts: RunOptions):
    """Every check that needs no writing, in one place: (train split, splits, new?, data record).

    The data is opened once: its dataset.json read once, the train split loaded once (the
    fold tasks get this split, not the path)."""
    run.check_target()
    source = open_data(data)
    split = load_train(source)  # first: what is wrong inside a shard is the clearer message
    fp = data_fingerprint(source)  # verifies the train shards against dataset.json
    run.check_data(fp)
    _check_recipe(run, recipe, opts.time_budget, opts.teacher)
    splits, new = plan_splits(recipe, split, run)
    teacher = _check_teacher(recipe, data, run, opts, fp, splits, {f for _, f in selected})
    for m, f in selected:  # filters that leave no training image; the global batch's split
        fold_rows(split, splits, f, recipe.member(m))
        check_batch(recipe.member(m).batch_size, opts.workers_per_fold, m)
    for m in recipe.members:  # collect reads every finished fold, selected or not
        for f in range(recipe.folds):
            if run.verify_fold(m.name, f) is None and (m.name, f) in selected:
                check_state(run.fold_dir(m.name, f), fold_name(m.name, f))
                _check_state_workers(run, m.name, f, opts.workers_per_fold)
    _check_resources(opts)
    if not opts.sequential:
        check_address(opts.address)  # before the run folder is written: ray.init would hang
    return split, splits, new, fp, teacher


def _check_teacher(recipe: Recipe, data: Path, run: RunFolder, opts: RunOptions, fp: dict,
                   splits: dict, folds: set[int]):
    """--teacher: the teacher (trained on this data with this run's `splits`, a model of each
    of `folds` in every member), a test split to pseudo-label, members that ignore the pixels
    it leaves unlabeled, stored per-fold pseudo-labels of this very teacher."""
    if opts.teacher is None:
        return None
    teacher = open_teacher(opts.teacher, fp, need_oof=False)
    if not any(m.pseudo_labels for m in recipe.members):
        raise InputError("--teacher: every member has pseudo_labels = false, so none would "
                         "train on the pseudo-labels; drop --teacher or set it true in one")
    for i, m in enumerate(recipe.members):
        if m.pseudo_labels and not m.loss.ignore_background:
            raise InputError(f"--teacher: member {m.name!r} (members[{i}]) has loss."
                             "ignore_background = false; pseudo-label pixels below "
                             "pseudo_threshold are marked 0, which only that ignores")
    if count_images(data, "test") == 0:
        raise InputError(f"{data}: the test split holds no images; nothing for --teacher to "
                         "pseudo-label")
    check_splits(teacher, splits)
    for k in sorted(folds):
        fold_models(teacher, k)
    if (run.path / TARGETS).exists():
        check_record(run.path / TARGETS, teacher.sha256, sha256_file(data / "dataset.json"),
                     "test", per_fold=True)
    return teacher


def _write_pseudo(run: RunFolder, teacher, data: Path, rt: Resolved) -> None:
    """The test images' pseudo-labels of every fold (fold k: the teacher's fold-k models),
    once, in the run's targets file (at the precision train-folds resolved for its folds)."""
    if teacher is None or (run.path / TARGETS).exists():
        return
    write_pseudo_labels(teacher, data, run.path / TARGETS, rt=rt,
                        dataset_sha256=sha256_file(data / "dataset.json"))


def _check_state_workers(run: RunFolder, member: str, fold: int, workers: int) -> None:
    """A saved state resumes only with the worker count that saved it (before Ray starts)."""
    state = run.fold_dir(member, fold) / STATE
    if (state / TRAINER_STATE).is_file():
        check_workers(state, read_trainer(state), workers)


def _start_run(recipe_path: Path, recipe: Recipe, run: RunFolder, splits: dict, new_splits: bool,
               fp: dict, epochs: int | None, time_budget: float | None,
               teacher: str | None = None) -> None:
    """Write the shared files a new run folder needs (under the run folder's lock; another
    process may have written them since `_validate`, so they are checked again)."""
    run.check_writable()
    _check_recipe(run, recipe, time_budget, teacher)
    run.check_data(fp)
    if not run.recipe.exists():
        pinned = {k: v for k, v in (("epochs", epochs), ("time_budget_s", time_budget),
                                    ("teacher", teacher)) if v is not None}
        if pinned:
            write_json_atomic(run.overrides, pinned)
        with atomic_path(run.recipe) as tmp:
            shutil.copyfile(recipe_path, tmp)
    if run.read_data() is None:
        run.write_data(fp)
    if new_splits:
        if run.read_splits() is None:
            run.write_splits(splits)
        elif run.read_splits() != splits:
            raise InputError(f"{run.splits}: written by another process with other folds; "
                             "use a new --out")


# --- Ray ---------------------------------------------------------------------------------------


class ProgressBoard:
    """A tiny Ray actor the tasks report events to; the driver drains it."""

    def __init__(self):
        self.events: list[dict] = []

    def report(self, ev: dict) -> None:
        self.events.append(ev)

    def drain(self) -> list[dict]:
        ev, self.events = self.events, []
        return ev


def _unwrap_task_error(e: Exception) -> Exception:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, InputError) else e


def lost_fold(e: Exception, member: str, fold: int, out) -> RunError:
    """The one line for a fold whose worker Ray stopped for good (memory monitor, crash,
    lost node) after its retries: what happened, and that a rerun resumes it."""
    import ray

    first = (str(e).strip().splitlines() or [""])[0]
    what = ("Ray's memory monitor killed its worker (the node ran out of memory)"
            if isinstance(e, ray.exceptions.OutOfMemoryError)
            else f"its worker died ({type(e).__name__}: {first[:160]})")
    return RunError(f"{fold_name(member, fold)}: {what}, and its retries are used up; "
                    f"finished folds are kept in {out}: run the same command again to resume "
                    "(with fewer parallel folds or more memory)")


class _Board:
    """The driver's side of the progress actor (restarted when Ray kills it); if it is
    lost for good, training goes on without the live view (one line says so)."""

    def __init__(self, view):
        import ray

        self.view = view
        self.actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(
            ProgressBoard).remote()

    def drain(self) -> None:
        import ray

        try:
            if self.actor is not None:
                self.view.update(ray.get(self.actor.drain.remote(), timeout=60))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            self.actor = None
            self.view.log(f"progress view lost ({type(e).__name__}); the folds keep training, "
                          "each fold's folder keeps its epochs")


def _run_ray(recipe, jobs, split, out, opts: RunOptions, fold_kwargs: dict, view) -> list[dict]:
    import ray

    from .cluster import ray_session

    fallback = "give --sequential to train in this process" + (
        " (with --workers-per-fold 1)" if opts.workers_per_fold > 1 else "")
    with ray_session(opts.address, fallback=fallback):
        have = ray.cluster_resources()
        check_fits(opts, have, "the Ray cluster")
        board = _Board(view)
        node_cpus = None
        if opts.threads is None:  # --threads pins the count
            node_cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        threads = opts.threads or max(1, int(opts.cpus_per_task))
        split_ref = ray.put(split)  # once: every fold reads it from the object store
        submit = submitter(recipe, split_ref, out, opts, fold_kwargs, board.actor, node_cpus,
                           threads)
        # Plain tasks queue in Ray; multi-worker folds queue here (raytrain's docstring).
        slots = len(jobs) if opts.workers_per_fold == 1 else fold_slots(opts, have)
        queue, refs = list(jobs), {}
        results = []
        try:
            while queue or refs:
                while queue and len(refs) < slots:
                    job = queue.pop(0)
                    refs[submit(*job)] = job
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                board.drain()
                for ref in ready:
                    job = refs.pop(ref)
                    try:
                        results.append(ray.get(ref))
                    except ray.exceptions.RayTaskError as e:
                        err = _unwrap_task_error(e)
                        view.fail(*job, str(err).splitlines()[0])
                        raise err from None
                    except ray.exceptions.RayError as e:  # the worker, not the fold, failed
                        err = lost_fold(e, *job, out)
                        view.fail(*job, str(err))
                        raise err from None
            board.drain()
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        return results


# --- the one entry point -------------------------------------------------------------------------


@reads_data
def train_folds(recipe_path: str | Path, data: str | Path, out: str | Path,
                options: RunOptions = RunOptions(), *, epochs: int | None = None,
                console=None) -> dict:
    """Train every selected (member, fold) of a recipe into run folder `out`; returns the
    ensemble file's dict (plus "trained" and "seconds").

    epochs: a training budget that replaces every member's epochs (recorded in the run
    folder), as `options.time_budget` does per fold (the two exclude each other).
    Everything the user could get wrong (recipe, precision, selection, resources, data, a
    run folder made with other data or another recipe, finished folds whose weights
    changed, unreadable saved states) is checked before anything is written or Ray starts.
    """
    from rich.console import Console

    t0 = time.perf_counter()
    console = console or Console()
    recipe_path, data, out = Path(recipe_path), Path(data).resolve(), Path(out).resolve()
    check_apart(out, "--out", data=data)
    if epochs is not None and options.time_budget is not None:
        raise InputError("--epochs and --time-budget both set the epoch count; give one of them")
    recipe = with_epochs(load_recipe(recipe_path), epochs)
    options.check()
    rt = options.resolve()
    selected = _select(recipe, options)
    run = RunFolder(out)
    if options.teacher is not None:
        options = dataclasses.replace(options, teacher=str(Path(options.teacher).resolve()))
    split, splits, new_splits, fp, teacher = _validate(recipe, selected, data, run, options)
    sources = open_sources(options.reuse, out)
    want = Wanted(recipe, splits, fp, rt, options.workers_per_fold, options.time_budget,
                  teacher.sha256 if teacher is not None else None)
    say = None if options.progress == "none" else functools.partial(
        console.print, highlight=False, soft_wrap=True)  # one line each, as view.log

    with contextlib.ExitStack() as held:
        with run.lock():
            _start_run(recipe_path, recipe, run, splits, new_splits, fp, epochs,
                       options.time_budget, options.teacher)
            jobs = [(m, f) for m, f in selected if run.read_done(m, f) is None]
            if jobs and options.log_with:
                options = replace(options, tracking=open_group(
                    run.path, check_trackers(options.log_with), options.resources(), fp))
            held.enter_context(run.lock_folds(jobs))
        adopted = adopt(sources, want, run, jobs, say)  # folds other runs trained alike
        jobs = [j for j in jobs if j not in {(d.member, d.fold) for d in adopted}]
        fold_kwargs = {"rt": rt, "splits": splits, "time_budget": options.time_budget,
                       "pseudo": options.teacher is not None, "tracking": options.tracking}
        if jobs:  # not under the run's lock (minutes); written whole, then renamed
            _write_pseudo(run, teacher, data, rt)
        done = _train(recipe, jobs, [j for j in selected if j not in jobs], split, run, options,
                      fold_kwargs, console)
        run.remember_done(done + adopted)  # weights hashed as each fold finished: not hashed again
        with run.lock():
            ens = collect(run, recipe, split, splits, data)
            if not same_folds(run, ens):
                # Keep an up-to-date ensemble file as it is: `select` may have set weights in it.
                run.write_ensemble(ens)
    if options.progress != "none":
        console.print(summary_table(ens))
        console.print(f"{run.ensemble.name} -> {run.ensemble} "
                      f"({len(jobs)} fold(s) trained, {len(adopted)} reused, "
                      f"{time.perf_counter() - t0:.1f} s)", highlight=False)
    return {**ens.to_json(), "trained": [fold_name(m, f) for m, f in jobs],
            "reused": {fold_name(d.member, d.fold): d.reused_from["run"] for d in adopted},
            "seconds": round(time.perf_counter() - t0, 3)}


def _train(recipe: Recipe, jobs, skipped, split, run: RunFolder, options: RunOptions,
           fold_kwargs: dict, console) -> list[Done]:
    """Train `jobs` in this process or on Ray, with the progress view; their done records."""
    from ._progress import ProgressView

    # Under a time budget each fold's count is decided when it starts (0 = not known yet).
    epochs = {m.name: 0 if options.time_budget else m.epochs for m in recipe.members}
    view = ProgressView([(m, f, epochs[m]) for m, f in jobs], mode=options.progress,
                        console=console, skipped=skipped)
    if skipped:
        view.log(f"{len(skipped)} fold(s) already finished in {run.path}, skipped")
    if not jobs:
        return []
    with view:
        if options.sequential:
            return [train_one_fold(recipe, m, f, split, run.path, threads=options.threads,
                                   progress=lambda ev: view.update([ev]), **fold_kwargs)
                    for m, f in jobs]
        return _run_ray(recipe, jobs, split, run.path, options, fold_kwargs, view)
