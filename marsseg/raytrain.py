"""What runs on Ray for train-folds: a fold as one plain task (`fold_task`), or with
--workers-per-fold N as N data-parallel processes on Ray Train (`fit_fold`).

`orchestrate` runs a fold with ``--workers-per-fold 1`` as one plain Ray task. With N > 1
it runs `fit_fold` as a zero-CPU launcher task per (member, fold); the launcher starts
a `TorchTrainer` whose N workers (``ScalingConfig``: one GPU each, or CPU processes
joined by gloo) each call `train.train_one_fold`, which finds the process group and
trains data-parallel (`dataparallel`). Several folds run side by side as several
launchers; the driver starts no more at once than the cluster holds (Ray Train V2
gives up on a worker group that waits for resources), so the folds queue in the
driver as plain tasks queue in Ray.

Why launcher tasks and not Ray Tune (one TorchTrainer per trial): the run folder
already is the experiment state (locks, resume from ``state/``, done files); Tune
would keep a second one (its experiment folder, trial restore) that could disagree
with it, and the driver's loop (progress board, fail fast on an InputError, cancel on
SIGTERM) stays the one `orchestrate` has. A cancelled launcher takes its trainer's
controller and workers with it (Ray actors die with the task that owns them).

Only rank 0 reports progress and writes (train_one_fold); a crash of any worker
fails the trainer, and the launcher fits it again (``max_retries``): every rank
resumes from the fold's saved state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from ._cores import CoreShare, share_folder
from .errors import InputError
from .records import Done
from .runfolder import RunFolder, fold_name
from .train import train_one_fold


def check_options(opts) -> None:
    """train-folds options that --workers-per-fold rules out (InputError, before Ray starts)."""
    n, g = opts.workers_per_fold, opts.gpus_per_task
    if n < 1:
        raise InputError(f"--workers-per-fold must be >= 1, got {n}")
    if g > 1:  # a worker trains on one device: more would be reserved and left idle
        raise InputError(f"--gpus-per-task {g:g}: a fold's worker trains on one GPU; to "
                         f"spread a fold over {g:g} GPUs use --workers-per-fold {g:g} "
                         f"--gpus-per-task 1")
    if n > 1 and g not in (0, 1):
        raise InputError(f"--workers-per-fold {n}: give --gpus-per-task 1 (a GPU per worker) "
                         f"or 0 (CPU workers), not {g:g}")
    if n > 1 and opts.sequential:
        raise InputError(f"--workers-per-fold {n}: not with --sequential (workers run on Ray)")
    if n > 1 and opts.time_budget is not None:
        raise InputError("--time-budget: not with --workers-per-fold > 1 (each worker would "
                         "time its own steps); give --epochs instead")
    if n > 1 and opts.teacher is not None:
        raise InputError("--teacher: not with --workers-per-fold > 1 yet (the pseudo-labelled "
                         "batches are not split across workers)")


def fold_slots(opts, have: dict) -> int:
    """Multi-worker folds the cluster runs at once (the rest wait in the driver)."""
    n = opts.workers_per_fold
    fits = [have.get("CPU", 0) // (opts.cpus_per_task * n)]
    if opts.gpus_per_task:
        fits.append(have.get("GPU", 0) // (opts.gpus_per_task * n))
    return max(1, int(min(fits)))


def check_fits(opts, have: dict, where: str) -> None:
    """One fold (all its workers) must fit in `have`: Ray would wait forever for it."""
    n = opts.workers_per_fold
    each = f" x --workers-per-fold {n}" if n > 1 else ""
    for flag, key, want in (("--cpus-per-task", "CPU", opts.cpus_per_task),
                            ("--gpus-per-task", "GPU", opts.gpus_per_task)):
        if want * n > have.get(key, 0):
            raise InputError(f"{flag} {want:g}{each}: {where} has {have.get(key, 0):g} {key}s")


def fold_task(recipe, member, fold, split, out, kwargs, threads, board, node_cpus):
    """Body of one Ray task: train one fold (``split``: the train split, from Ray's object
    store; ``kwargs``: the driver's resolved device/precision, splits, ...), sending
    progress events to the board actor.

    With `node_cpus` ({node id: CPUs}; no --threads given) the fold counts the job's folds
    running on its node at every epoch start (marker files, no Ray call: see _cores.py) and
    takes its share of the CPUs, so folds still running take over the cores of finished ones.
    """
    import ray

    progress = None
    if board is not None:
        def progress(ev):
            board.report.remote(ev)
    ctx = ray.get_runtime_context()
    with contextlib.ExitStack() as stack:
        threads_fn = None
        if node_cpus is not None:
            share = stack.enter_context(CoreShare(
                share_folder(ctx.get_job_id(), ctx.get_node_id()), fold_name(member, fold),
                node_cpus.get(ctx.get_node_id(), threads), threads))
            threads_fn = share.threads
        return train_one_fold(recipe, member, fold, split, out, threads=threads, progress=progress,
                              threads_fn=threads_fn, **kwargs)


def submitter(recipe, split_ref, out, opts, kwargs: dict, board, node_cpus, threads):
    """submit(member, fold) -> ObjectRef: a plain fold task, or a Ray Train launcher (N > 1).
    split_ref: the train split in Ray's object store; kwargs: `train_one_fold`'s keywords as
    the driver resolved them (device and precision, splits, time budget, ...)."""
    import ray

    if opts.workers_per_fold == 1:
        task = ray.remote(fold_task)

        def submit(member, fold):
            return task.options(num_cpus=opts.cpus_per_task, num_gpus=opts.gpus_per_task,
                                max_retries=opts.max_retries, retry_exceptions=False,
                                name=fold_name(member, fold)).remote(
                recipe, member, fold, split_ref, str(out), kwargs, threads, board, node_cpus)
        return submit

    # The launcher holds no resources: its trainer's workers reserve theirs.
    launcher = ray.remote(num_cpus=0, max_retries=0)(fit_fold)

    def submit(member, fold):
        return launcher.options(name=fold_name(member, fold)).remote(
            recipe, member, fold, split_ref, str(out), workers=opts.workers_per_fold,
            cpus_per_worker=opts.cpus_per_task, gpu=opts.gpus_per_task >= 1, threads=threads,
            kwargs=kwargs, board=board, node_cpus=node_cpus,
            max_retries=opts.max_retries)
    return submit


def _worker(config: dict) -> None:
    """One Ray Train worker: train_one_fold inside the trainer's process group."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    threads = config["threads"]
    # accelerate sets torch's threads to cores / local workers unless OMP_NUM_THREADS is set
    os.environ["OMP_NUM_THREADS"] = str(threads)
    board = config["board"]
    progress = board.report.remote if board is not None and rank == 0 else None
    member, fold, node_cpus = config["member"], config["fold"], config["node_cpus"]
    with contextlib.ExitStack() as stack:
        threads_fn = None
        if node_cpus is not None:  # each worker process takes its share of its node's cores
            ctx = ray.get_runtime_context()
            share = stack.enter_context(CoreShare(
                share_folder(ctx.get_job_id(), ctx.get_node_id()),
                f"{fold_name(member, fold)}-rank{rank}",
                node_cpus.get(ctx.get_node_id(), threads), threads))
            threads_fn = share.threads
        train_one_fold(config["recipe"], member, fold, config["data"], config["out"],
                       threads=threads, progress=progress, threads_fn=threads_fn,
                       **config["kwargs"])


def input_error(e: BaseException, seen: set | None = None) -> InputError | None:
    """The InputError a worker raised, found inside Ray Train's and Ray's wrappers."""
    seen = set() if seen is None else seen
    if e is None or id(e) in seen:
        return None
    seen.add(id(e))
    if isinstance(e, InputError):
        return e
    inner = [getattr(e, "cause", None), getattr(e, "controller_failure", None),
             e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    for x in inner:
        if isinstance(x, BaseException) and (found := input_error(x, seen)) is not None:
            return found
    return None


def fit_fold(recipe, member: str, fold: int, data, out: str, *, workers: int,
             cpus_per_worker: float, gpu: bool, threads: int, kwargs: dict, board=None,
             node_cpus: dict | None = None, max_retries: int = 3) -> Done:
    """Train one (member, fold) with `workers` Ray Train workers; returns its `Done`.

    Body of the launcher task; ``data``: the train split (or its shard folder), handed to
    every worker. A failed fit (a worker died, a collective broke) is fitted
    again up to `max_retries` times, resuming from the fold's state; an InputError from
    any worker is raised as it is.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
    config = {"recipe": recipe, "member": member, "fold": fold, "data": data, "out": out,
              "threads": threads, "board": board, "node_cpus": node_cpus, "kwargs": kwargs}
    scratch = tempfile.mkdtemp(prefix="marsseg-raytrain-")  # Ray Train's own run records
    try:
        for attempt in range(max_retries + 1):
            trainer = TorchTrainer(
                _worker, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                             resources_per_worker=resources),
                torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                run_config=RunConfig(name=f"{fold_name(member, fold)}-{attempt}".replace("/", "-"),
                                     storage_path=scratch,
                                     failure_config=FailureConfig(max_failures=0)))
            try:
                trainer.fit()
                break
            except Exception as e:  # noqa: BLE001 - sorted below: the user's error or a retry
                err = input_error(e)
                if err is not None:
                    raise InputError(str(err)) from None
                if attempt == max_retries:
                    raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    done = RunFolder(out).read_done(member, fold)
    if done is None:
        raise RuntimeError(f"{fold_name(member, fold)}: the trainer finished without a done file")
    return done
