"""Experiment tracking through accelerate's trackers (`train-folds --log-with`).

Each (member, fold) is one tracked run named ``member/fold_k``, grouped under the run
folder's name: TensorBoard writes ``RUN/tb/<member>/fold_<k>/`` (and ``RUN/tb/ensemble/``),
MLflow nests the fold runs under one parent run per run folder (tag ``marsseg.group``),
W&B puts them in one ``group``. The recipe is logged once per tracked run as
hyperparameters; every epoch logs the fold's metrics line with ``step=epoch``.

Two small files keep the runs' identities, so a resumed fold continues its own run:

    RUN/tracking.json              the group: trackers used, MLflow store, experiment and parent
                                   run, W&B project and the ensemble's W&B run id
    RUN/<member>/fold_<k>/tracking.json   this fold's run ids and the last epoch it logged

Only the main process of a fold's accelerator starts and logs. Without ``--log-with``
nothing here runs and nothing is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path

from . import CLASS_NAMES
from ._io import read_json, write_json_atomic
from .errors import InputError

TRACKING = "tracking.json"  # in the run folder (the group) and in each fold folder (its runs)
TB = "tb"  # RUN/tb/<member>/fold_<k>: one TensorBoard run per fold
MLFLOW_DB = "mlflow.db"  # the default MLflow store: sqlite in the run folder
ENSEMBLE_RUN = "ensemble"  # select / evaluate scores: RUN/tb/ensemble, the MLflow parent run

# accelerate's tracker names -> the package each imports
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "aim": "aim",
            "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive",
            "swanlab": "swanlab", "trackio": "trackio"}
IN_EXTRA = ("tensorboard", "mlflow")  # what marsseg[track] installs
GROUPED = ("tensorboard", "mlflow", "wandb")  # grouped and resumed; others get plain runs


def _quiet_network() -> None:
    """A local MLflow store sends nothing anywhere: its usage telemetry is off unless the
    user turned it on."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def check_trackers(names) -> tuple[str, ...]:
    """The `--log-with` names, checked (known to accelerate, package importable), in order,
    without repeats. InputError naming the install command for a missing package."""
    out: list[str] = []
    for name in names or ():
        name = name.strip().lower()
        if name not in PACKAGES:
            raise InputError(f"--log-with: unknown tracker {name!r} "
                             f"(accelerate's trackers: {', '.join(PACKAGES)})")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            how = "pip install 'marsseg[track]'" if name in IN_EXTRA else f"pip install {name}"
            raise InputError(f"--log-with {name}: the {PACKAGES[name]} package is not "
                             f"installed; {how}")
        if name not in out:
            out.append(name)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
    """The tracking of one train-folds run, resolved once by the driver and sent to every fold."""

    trackers: tuple[str, ...]
    group: str  # the run folder's name
    run_dir: str
    resources: dict  # how the folds run (CPUs, GPUs per task, threads option): hyperparameters
    data: dict  # the run's data record (dataset.json sha256, source sha256)
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    mlflow_parent: str | None = None
    wandb_project: str | None = None


def _read(path: Path) -> dict:
    d = read_json(path, "tracking record", "delete it to start new tracked runs")
    return {} if d is None else d


def open_group(run_dir: Path, trackers: tuple[str, ...], resources: dict,
               data: dict) -> TrackingSpec | None:
    """Record the run folder's tracking group (call under the run folder's lock); None without
    trackers. The MLflow store, experiment and parent run recorded first are kept, so later
    commands and resumed folds log to the same place."""
    if not trackers:
        return None
    _quiet_network()
    run_dir = Path(run_dir)
    rec = _read(run_dir / TRACKING)
    rec["group"] = run_dir.name
    rec["trackers"] = sorted(set(rec.get("trackers", [])) | set(trackers))
    spec = TrackingSpec(trackers=trackers, group=run_dir.name, run_dir=str(run_dir),
                        resources=dict(resources),
                        data={k: data.get(k) for k in ("dataset_sha256", "source_sha256")})
    if "mlflow" in trackers:
        rec["mlflow"] = _mlflow_group(run_dir, rec.get("mlflow", {}))
        m = rec["mlflow"]
        spec = dataclasses.replace(spec, mlflow_uri=mlflow_uri(run_dir, m),
                                   mlflow_experiment=m["experiment"],
                                   mlflow_parent=m["parent_run_id"])
    if "wandb" in trackers:
        w = rec.setdefault("wandb", {})
        w.setdefault("project", os.environ.get("WANDB_PROJECT", "marsseg"))
        spec = dataclasses.replace(spec, wandb_project=w["project"])
    write_json_atomic(run_dir / TRACKING, rec)
    return spec


def _mlflow_group(run_dir: Path, m: dict) -> dict:
    """The MLflow store (MLFLOW_TRACKING_URI, else sqlite in the run folder), the experiment
    (MLFLOW_EXPERIMENT_NAME, else "marsseg") and the run folder's parent run, made once here
    so that folds running at once never race to create them."""
    from mlflow.tracking import MlflowClient

    if "uri" not in m:  # the first time; None (the default) keeps a moved run folder's store
        m = {**m, "uri": os.environ.get("MLFLOW_TRACKING_URI") or None}
    uri = mlflow_uri(run_dir, m)
    name = m.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME", "marsseg")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    parent = m.get("parent_run_id")
    if parent is None:
        r = client.create_run(exp_id, run_name=run_dir.name,
                              tags={"marsseg.group": run_dir.name, "marsseg.run_dir": str(run_dir)})
        parent = r.info.run_id
        client.set_terminated(parent)
    return {"uri": m["uri"], "experiment": name, "experiment_id": exp_id,
            "parent_run_id": parent}


def mlflow_uri(run_dir: Path, m: dict) -> str:
    """The recorded MLflow store; None stands for sqlite RUN/mlflow.db of this run folder."""
    return m.get("uri") or f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"


# --- what is logged ------------------------------------------------------------------------------


def _param(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return "None" if v is None else v
    return json.dumps(v, sort_keys=True)


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: _param(v)})
    return out


def fold_config(spec: TrackingSpec, recipe, member, fold: int, precision: str, device: str,
                threads: int) -> dict:
    """The hyperparameters of one fold's tracked run: the member's config (flattened, its
    effective epochs), recipe name, seed, folds, data fingerprint, precision and resources."""
    cfg = {"recipe": recipe.name, "seed": recipe.seed, "folds": recipe.folds, "fold": fold,
           "epochs": member.epochs, "precision": precision, "device": device,
           "threads": threads}
    cfg.update(_flatten(dataclasses.asdict(member), "member"))
    cfg.update(_flatten(spec.data, "data"))
    cfg.update(_flatten(spec.resources, "resources"))
    return {k: _param(v) for k, v in cfg.items()}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def epoch_values(row: dict) -> dict:
    """A metrics.jsonl line as tracker scalars (missing or non-finite scores left out)."""
    v = {"train/loss": row.get("loss"), "val/miou": row.get("val_miou"), "lr": row.get("lr"),
         "img_s": row.get("img_s"), "threads": row.get("threads"),
         "epoch_seconds": row.get("seconds")}
    for c, iou in enumerate(row.get("val_iou") or []):
        v[f"val/iou/{c}_{_slug(CLASS_NAMES[c])}"] = iou
    return {k: x for k, x in v.items() if x is not None}


def score_values(prefix: str, miou, iou) -> dict:
    """A score (course mIoU and per-class IoU, fractions) as tracker scalars under `prefix`."""
    v = {f"{prefix}/miou": miou}
    for c, x in enumerate(iou or []):
        v[f"{prefix}/iou/{c}_{_slug(CLASS_NAMES[c])}"] = x
    return {k: x for k, x in v.items() if x is not None}


# --- one fold's tracked run ------------------------------------------------------------------------


class FoldRun:
    """The tracked run of one (member, fold): accelerate trackers built for `log_with`,
    started on the accelerator's main process only, ids kept in the fold's tracking.json."""

    def __init__(self, spec: TrackingSpec, fold_dir: Path, name: str):
        self.spec, self.fold_dir, self.name = spec, Path(fold_dir), name
        self.record = _read(self.fold_dir / TRACKING)
        self.accelerator = None
        if "wandb" in spec.trackers:
            self.record.setdefault("wandb_id", uuid.uuid4().hex[:12])
        self.log_with = [self._tracker(t) for t in spec.trackers]

    def _tracker(self, name: str):
        from accelerate import tracking as at

        s, group = self.spec, self.spec.group
        if name == "tensorboard":
            return _tensorboard_tracker()(self.name, str(Path(s.run_dir) / TB))
        if name == "mlflow":
            tags = {"mlflow.parentRunId": s.mlflow_parent, "marsseg.group": group,
                    "marsseg.fold": self.name}
            return at.MLflowTracker(experiment_name=s.mlflow_experiment,
                                    run_id=self.record.get("mlflow_run_id"), tags=tags,
                                    run_name=self.name)
        if name == "wandb":
            return at.WandBTracker(s.wandb_project, group=group, name=self.name,
                                   id=self.record["wandb_id"], resume="allow", dir=s.run_dir)
        return name  # another accelerate tracker: its own defaults, project = the fold's name

    def start(self, f, metrics) -> None:
        """Start the trackers of fold setup `f` (main process only), log its config to those
        new to this fold, then the rows of `metrics()` a crash kept from being logged."""
        accelerator = f.accelerator
        if not accelerator.is_main_process:
            return
        config = fold_config(self.spec, f.recipe, f.member, f.fold, f.precision,
                             str(accelerator.device), torch_threads())
        self.accelerator = accelerator
        _quiet_network()
        if self.spec.mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(self.spec.mlflow_uri)
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.fold_dir / TRACKING, self.record)  # the W&B id before it starts
        accelerator.init_trackers(self.name)
        started = self.record.setdefault("started", [])
        for t in accelerator.trackers:
            if t.name not in started:
                t.store_init_configuration(config)
                started.append(t.name)
        if "mlflow" in self.spec.trackers:
            self.record["mlflow_run_id"] = accelerator.get_tracker("mlflow").tracker.info.run_id
        self._save()
        for row in metrics():
            if row["epoch"] > self.record.get("logged_epoch", -1):
                self.epoch(row)

    def epoch(self, row: dict) -> None:
        """Log one metrics line with step = its epoch (main process only)."""
        if self.accelerator is None:
            return
        self.accelerator.log(epoch_values(row), step=int(row["epoch"]))
        self.record["logged_epoch"] = int(row["epoch"])
        self._save()

    def close(self, failed: bool = False) -> None:
        """End the trackers' runs (accelerate's end_training); an MLflow run that failed or
        was interrupted ends KILLED (its resume sets it running again). Safe to call twice."""
        if self.accelerator is None:
            return
        if failed and "mlflow" in self.spec.trackers:
            import mlflow

            mlflow.end_run(status="KILLED")
        self.accelerator.end_training()
        self.accelerator = None

    def __enter__(self) -> FoldRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _save(self) -> None:
        write_json_atomic(self.fold_dir / TRACKING, self.record)


def _tensorboard_tracker():
    """accelerate's TensorBoard tracker, with the hyperparameters written into the fold's own
    run: its `add_hparams` opens a new sub-run per call, a second "run" per fold."""
    from accelerate.tracking import TensorBoardTracker, on_main_process

    class TensorBoard(TensorBoardTracker):
        @on_main_process
        def store_init_configuration(self, values: dict):
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(values, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.flush()

    return TensorBoard


class NoRun:
    """A fold without tracking: the same calls, nothing done."""

    log_with = None

    def start(self, f, metrics) -> None:
        pass

    def epoch(self, row: dict) -> None:
        pass

    def __enter__(self) -> NoRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def fold_run(spec: TrackingSpec | None, fold_dir: Path, run_dir: Path) -> FoldRun | NoRun:
    """The tracked run of a fold folder, named by its path in the run folder (`member/fold_k`),
    or a no-op one without `spec`."""
    if spec is None:
        return NoRun()
    return FoldRun(spec, fold_dir, Path(fold_dir).relative_to(run_dir).as_posix())


# --- the group: select and evaluate ------------------------------------------------------------


def log_group(run_dir: Path, values: dict, step: int | None = None) -> None:
    """Log ensemble scores to the run folder's group (the trackers train-folds used): TensorBoard
    RUN/tb/ensemble, the MLflow parent run, a W&B run "<group>/ensemble" in the group. A tracker
    whose package is gone is named on stderr and skipped (the scores are in the run folder)."""
    run_dir = Path(run_dir)
    rec = _read(run_dir / TRACKING)
    if not rec.get("group") or not rec.get("trackers") or not values:
        return
    _quiet_network()
    for name in rec["trackers"]:
        if name not in GROUPED:
            continue
        if importlib.util.find_spec(PACKAGES[name]) is None:
            print(f"tracking: {name} is not installed, scores not logged to it "
                  f"(pip install 'marsseg[track]')", file=sys.stderr)
            continue
        try:
            tracker = _group_tracker(run_dir, rec, name)
            tracker.start()
            tracker.log(values, step=step)
            tracker.finish()
        except Exception as e:  # noqa: BLE001 - the scores are written; tracking is extra
            print(f"tracking: {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  f"; scores not logged to it", file=sys.stderr)


def _group_tracker(run_dir: Path, rec: dict, name: str):
    from accelerate import tracking as at

    if name == "tensorboard":
        return at.TensorBoardTracker(ENSEMBLE_RUN, str(run_dir / TB))
    if name == "mlflow":
        import mlflow

        m = rec["mlflow"]
        mlflow.set_tracking_uri(mlflow_uri(run_dir, m))
        return at.MLflowTracker(experiment_name=m["experiment"], run_id=m["parent_run_id"])
    w = rec["wandb"]
    if "ensemble_id" not in w:
        w["ensemble_id"] = uuid.uuid4().hex[:12]
        write_json_atomic(run_dir / TRACKING, rec)
    return at.WandBTracker(w["project"], group=rec["group"], name=f"{rec['group']}/{ENSEMBLE_RUN}",
                           id=w["ensemble_id"], resume="allow", dir=str(run_dir))
