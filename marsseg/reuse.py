"""train-folds --reuse RUN: adopt finished folds of other run folders instead of training them.

Each (member, fold) that train-folds would train is looked up in every --reuse run folder in
order; the first one whose fold of that member name is finished, and provably the fold this
command would train, is copied into the run (`runfolder.RunFolder.adopt_fold`) and not
trained. Provably the same fold means, against what the source's own files record:

- the same data: the train shards' sha256s (its data.json);
- the same splits: splits.json whole (k, split seed, every fold's ids);
- the same recipe seed: a fold's randomness comes from (seed, member, fold, epoch)
  (`train.fold_seed`), so the member's name is part of it too;
- the same member block: its recipe.toml with overrides.json's --epochs, every key compared;
- the same --teacher: none on both sides, or pseudo-labels of the same teacher ensemble
  (its sha256) on the same data at the same precision (the source's targets record); a
  member with pseudo_labels = false counts as trained without --teacher on its side;
- no --time-budget on either side (a budgeted fold's epochs come from a timing probe);
- the precision, device type and data-parallel workers its done.json records.

A fold that differs is trained, and one line names its first difference. Not compared:
the code that trained the source (folds of an older marsseg whose training changed since
are adopted as they are), and the torch thread count, which train-folds without
--threads changes as folds finish (so it cannot be required): on a CPU it changes
float rounding, so an adopted fold equals the fold trained here bit for bit at the same
thread count only (the line that reports an adoption names the source's count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Recipe, parse_recipe, with_epochs
from .device import Resolved
from .errors import InputError
from .records import Done
from .runfolder import (
    DONE,
    METRICS,
    OOF,
    RECIPE,
    SPLITS,
    RunFolder,
    fold_name,
    read_done,
    read_metrics,
    verify_fold_folder,
)
from .teaching import TARGETS, TargetsRecord, read_record


@dataclasses.dataclass(frozen=True)
class Source:
    """A --reuse run folder, read once: what its folds were trained with."""

    run: RunFolder
    recipe: Recipe  # its recipe.toml with its --epochs applied
    overrides: dict  # its overrides.json (epochs, time_budget_s, teacher)
    train_shards: list  # the sha256 of every train shard (data.json)
    splits: dict
    targets: TargetsRecord | None  # its pseudo-labels' record (--teacher)


@dataclasses.dataclass(frozen=True)
class Wanted:
    """What this command would train a fold with (resolved by train-folds)."""

    recipe: Recipe  # its --epochs applied
    splits: dict
    fp: dict  # `runfolder.data_fingerprint` of the data
    rt: Resolved
    workers: int = 1
    time_budget: float | None = None
    teacher_sha256: str | None = None  # `teacher.teacher_sha256` of --teacher


def open_source(path: str | Path, out: Path) -> Source:
    """A --reuse run folder, checked and read; InputError naming it when it is missing, not
    a train-folds run folder, unreadable, or the --out run folder itself."""
    import tomllib

    p = Path(path).resolve()
    if p == Path(out).resolve():
        raise InputError(f"--reuse {path}: is --out itself (its finished folds are kept "
                         "anyway); name another run folder")
    if not p.is_dir():
        raise InputError(f"--reuse {path}: " + ("not a folder" if p.exists() else
                                                "no such run folder"))
    run = RunFolder(p)
    if not run.recipe.is_file():
        raise InputError(f"--reuse {path}: not a train-folds run folder (no {RECIPE})")
    try:
        doc = tomllib.loads(run.recipe.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{run.recipe}: unreadable recipe ({type(e).__name__}: {e})") from None
    recipe = parse_recipe(doc, name="reused", source=str(run.recipe), check_models=False)
    overrides = run.read_overrides()
    data, splits = run.read_data(), run.read_splits()
    if data is None or splits is None:
        missing = run.data if data is None else run.splits
        raise InputError(f"--reuse {path}: not a train-folds run folder ({missing.name} is "
                         "missing)")
    epochs = overrides.get("epochs")
    if epochs is not None and (type(epochs) is not int or epochs < 1):
        raise InputError(f"{run.overrides}: 'epochs' is {epochs!r}, expected an integer >= 1")
    targets = read_record(p / TARGETS) if (p / TARGETS).exists() else None
    shas = [s.get("sha256") if isinstance(s, dict) else None for s in data["train_shards"]]
    return Source(run, with_epochs(recipe, epochs), overrides, shas, splits, targets)


def open_sources(paths: Sequence[str], out: Path) -> list[Source]:
    """Every --reuse run folder in order (a folder named twice counts once)."""
    sources: dict[Path, Source] = {}
    for path in paths:
        s = open_source(path, out)
        sources.setdefault(s.run.path, s)
    return list(sources.values())


def _diff(old, new, key: str = "") -> str | None:
    """The first field where two configs differ, as "key old != new" (None: equal)."""
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            d = _diff(getattr(old, f.name), getattr(new, f.name), f"{key}.{f.name}".lstrip("."))
            if d is not None:
                return d
        return None
    return None if old == new else f"{key} {old!r} != {new!r}"


def _splits_diff(old: dict, new: dict) -> str | None:
    if old["k"] != new["k"]:
        return f"folds k={old['k']} != k={new['k']}"
    if old["seed"] != new["seed"]:
        return f"split seed {old['seed']} != {new['seed']}"
    return None if old["folds"] == new["folds"] else f"other fold assignment ({SPLITS})"


def _teacher_diff(src: Source, want: Wanted, member: str, fold: int) -> str | None:
    """The first difference of the pseudo-labels the two runs' fold of `member` trains on
    (none on a side without --teacher or whose member has pseudo_labels = false)."""
    theirs = src.overrides.get("teacher") if src.recipe.member(member).pseudo_labels else None
    mine = want.teacher_sha256 if want.recipe.member(member).pseudo_labels else None
    if (theirs is None) != (mine is None):
        off = " (pseudo_labels = false)"
        if theirs is not None:
            return f"--teacher {theirs} there, none here" + (off if want.teacher_sha256 else "")
        return "--teacher here, none there" + (off if src.overrides.get("teacher") else "")
    if theirs is None:
        return None
    rec = src.targets
    if rec is None or rec.pseudo_folds is None or fold not in rec.pseudo_folds:
        return f"no pseudo-labels of fold {fold} in its {TARGETS}"
    if rec.teacher_sha256 != want.teacher_sha256:
        return (f"pseudo-labels of another teacher ensemble (sha256 {rec.teacher_sha256[:12]} "
                f"!= {want.teacher_sha256[:12]})")
    if rec.dataset_sha256 != want.fp["dataset_sha256"]:
        return "pseudo-labels of other test images (dataset.json sha256 differs)"
    if rec.precision != want.rt.precision:
        return f"pseudo-labels in precision {rec.precision} != {want.rt.precision}"
    return None


def _pseudo_keys(m, teacher):
    """The member block as compared: whether it uses pseudo-labels is `_teacher_diff`'s
    question (pseudo_labels = true without --teacher trains like false), and a threshold
    of pseudo-labels it does not use changes nothing."""
    if teacher is not None and m.pseudo_labels:
        return m
    return dataclasses.replace(m, pseudo_labels=False, pseudo_threshold=0.0)


def _done_diff(done: Done, want: Wanted, member: str, fold: int) -> str | None:
    if (done.member, done.fold) != (member, fold):
        return f"its {DONE} is of {fold_name(done.member, done.fold)}"
    if done.precision != want.rt.precision:
        return f"precision {done.precision} != {want.rt.precision}"
    if done.device.split(":")[0] != want.rt.device.type:
        return f"device {done.device} != {want.rt.device.type}"
    if done.workers != want.workers:
        return f"workers per fold {done.workers} != {want.workers}"
    return None


def first_difference(src: Source, want: Wanted, member: str, fold: int,
                     done: Done) -> str | None:
    """Why `src`'s finished fold (`done`) is not the fold `want` would train (None: it is)."""
    if src.train_shards != [s["sha256"] for s in want.fp["train_shards"]]:
        return "other data (its train shards differ)"
    why = _splits_diff(src.splits, want.splits)
    if why is None and src.recipe.seed != want.recipe.seed:
        why = f"seed {src.recipe.seed} != {want.recipe.seed}"
    if why is None and (src.overrides.get("time_budget_s") is not None
                        or want.time_budget is not None):
        where = "there" if src.overrides.get("time_budget_s") is not None else "here"
        why = f"--time-budget {where}: its epochs depend on timing"
    if why is None and member not in [m.name for m in src.recipe.members]:
        why = f"its recipe has no member {member!r}"
    why = why or _teacher_diff(src, want, member, fold)
    if why is not None:
        return why
    why = _diff(_pseudo_keys(src.recipe.member(member), src.overrides.get("teacher")),
                _pseudo_keys(want.recipe.member(member), want.teacher_sha256))
    if why is None and not (src.run.fold_dir(member, fold) / OOF).is_file():
        why = f"no {OOF}"
    return why or _done_diff(done, want, member, fold)


def _candidate(src: Source, want: Wanted, member: str, fold: int) -> tuple[Done | None, str | None]:
    """(done, None) for a fold of `src` to adopt; (None, why) for one that differs;
    (None, None) when `src` has no finished fold of that member."""
    folder, name = src.run.fold_dir(member, fold), fold_name(member, fold)
    try:
        done = read_done(folder, name)
        if done is None:
            return None, None
        why = first_difference(src, want, member, fold, done)
        if why is None:
            verify_fold_folder(folder, name)  # its weights are the ones done.json names
    except InputError as e:  # a broken fold there is a difference, not this run's error
        return None, str(e).split("; delete")[0]
    return (None, why) if why else (done, None)


def _threads(folder: Path) -> str:
    """", trained at N thread(s)" from a fold's metrics (on a CPU the thread count changes
    float rounding, so weights are bit-equal to a fold trained at the same count only)."""
    n = sorted({r["threads"] for r in read_metrics(folder / METRICS) if "threads" in r})
    if not n:
        return ""
    return f", trained at {n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'} thread(s)"


def adopt(sources: Sequence[Source], want: Wanted, run: RunFolder,
          jobs: Sequence[tuple[str, int]], say: Callable[[str], None] | None) -> list[Done]:
    """Adopt into `run` every job of `jobs` that a source has provably the same (the caller
    holds the jobs' fold locks); one line to `say` (None: silent) per fold adopted and per
    candidate not adopted. Returns the adopted folds' done records."""
    say = say or (lambda line: None)
    adopted = []
    for member, fold in jobs:
        for src in sources:
            done, why = _candidate(src, want, member, fold)
            if why is not None:
                say(f"{member} fold {fold}: not reused from {src.run.path} ({why})")
            if done is None:
                continue
            origin = {"run": str(src.run.path), "fold": fold_name(member, fold),
                      "sha256": done.sha256}
            adopted.append(run.adopt_fold(src.run.fold_dir(member, fold), done, origin))
            say(f"{member} fold {fold}: reused from {src.run.path} (weights sha256 "
                f"{done.sha256[:12]}{_threads(run.fold_dir(member, fold))}; not trained)")
            break
    return adopted
