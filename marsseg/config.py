"""Recipes: what to learn, as frozen dataclasses parsed strictly from TOML.

A recipe (``ensembles/<name>.toml``) names one or more ensemble members, each
with its model, loss, augmentation, optimizer, LR schedule, epochs, batch size,
early stopping, data filters and sampling, plus the fold count and seed shared by all.
How to run (precision, threads, Ray address) is NOT here: those are CLI flags.

Unknown keys, wrong types and out-of-range values raise `InputError` naming
``<file>: <key.path>``. A ``[defaults]`` table, deep-merged under every
``[[members]]`` entry, keeps multi-member recipes short.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from . import NUM_CLASSES
from ._io import name_problem
from .errors import InputError


class _Bad(ValueError):
    """Raised inside validation with the offending key (relative to the table)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise _Bad(key, message)


def _prob(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _require(0.0 <= v <= 1.0, n, f"must be a probability in [0, 1], got {v}")


def _nonneg(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _require(v >= 0, n, f"must be >= 0, got {v}")


def _per_class(values: tuple[float, ...], key: str) -> None:
    """An explicit per-class list: one finite number >= 0 per class, not all 0."""
    _require(len(values) == NUM_CLASSES, key,
             f"needs one value per class ({NUM_CLASSES}), got {len(values)}")
    for i, v in enumerate(values):
        _require(0 <= v < float("inf"), f"{key}[{i}]", f"must be a finite number >= 0, got {v}")
    _require(any(v > 0 for v in values), key, "every value is 0")


LOSS_TERMS = ("ce", "dice", "focal", "lovasz")
CLASS_WEIGHTING = ("none", "inverse", "inverse_sqrt", "effective")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step", "plateau")
CUTMIX_MODES = ("sample", "batch")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelConfig:
    """Registry name + keyword arguments for `models.registry.build_model`."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossConfig:
    """Weighted sum of loss terms; class weights (ce, focal) computed from the training pixels
    by a method, or given explicitly as one number per class, then times `class_scale`."""

    terms: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    # none | inverse | inverse_sqrt | effective, or an explicit list such as [0, 1, 1, 1, 4]
    class_weights: str | tuple[float, ...] = "none"
    class_scale: tuple[float, ...] = ()  # per-class factors on the weights, e.g. [1, 1, 1, 1, 2]
    beta: float = 0.9999  # for class_weights = "effective" (Cui et al. 2019)
    ignore_background: bool = False  # class 0 pixels contribute nothing to the loss
    focal_gamma: float = 2.0

    def __post_init__(self):
        _require(len(self.terms) > 0, "terms", "needs at least one loss term")
        for k, v in self.terms.items():
            _require(k in LOSS_TERMS, f"terms.{k}",
                     f"unknown loss term (valid: {', '.join(LOSS_TERMS)})")
            _require(v >= 0 and v != float("inf"), f"terms.{k}",
                     f"weight must be a finite number >= 0, got {v}")
        _require(any(v > 0 for v in self.terms.values()), "terms",
                 f"every loss weight is 0 ({self.terms}); nothing would be learned, "
                 "give at least one term a weight > 0")
        if isinstance(self.class_weights, tuple):
            _per_class(self.class_weights, "class_weights")
        else:
            _require(self.class_weights in CLASS_WEIGHTING, "class_weights",
                     f"unknown method {self.class_weights!r} (valid: "
                     f"{', '.join(CLASS_WEIGHTING)}, or a list of {NUM_CLASSES} numbers)")
        if self.class_scale:
            _per_class(self.class_scale, "class_scale")
        _require(0.0 < self.beta < 1.0, "beta", f"must be in (0, 1), got {self.beta}")
        _nonneg(self, "focal_gamma")


@dataclass(frozen=True)
class AugmentConfig:
    """Batched augmentation on the training device (probabilities per image)."""

    hflip: float = 0.0
    vflip: float = 0.0  # off by default: terrain has a horizon
    cutmix: float = 0.0
    # batch: with p = cutmix the whole batch gets one box from a permutation of itself (the
    # CutMix paper's code; 2-3 mIoU better than per-sample on real-mars fold 0, issue 10);
    # sample: each image gets its own box from a random partner with p = cutmix
    cutmix_mode: str = "batch"
    # per image, with this probability: paste ALL big-rock pixels of one random
    # big-rock training image at the same position (the reference report's class-4 CutMix)
    rock_paste: float = 0.0
    rock_target: float = 0.0  # paste big-rock crops until class 4 is this pixel share
    brightness: float = 0.0  # jitter amplitude (fraction)
    contrast: float = 0.0

    def __post_init__(self):
        _prob(self, "hflip", "vflip", "cutmix", "rock_paste")
        _require(self.cutmix_mode in CUTMIX_MODES, "cutmix_mode",
                 f"must be one of {', '.join(CUTMIX_MODES)}, got {self.cutmix_mode!r}")
        _require(0.0 <= self.rock_target < 1.0, "rock_target",
                 f"must be a pixel share in [0, 1), got {self.rock_target}")
        _nonneg(self, "brightness", "contrast")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    # weight decay also on norm weights and biases (1-d tensors), as plain torch.optim does;
    # false (decay on conv weights only) trained worse on real-mars fold 0 (issue 10)
    decay_norms: bool = True

    def __post_init__(self):
        _require(self.name in OPTIMIZERS, "name",
                 f"unknown optimizer {self.name!r} (valid: {', '.join(OPTIMIZERS)})")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _nonneg(self, "weight_decay", "momentum")


@dataclass(frozen=True)
class ScheduleConfig:
    """LR schedule per optimizer step; warmup is linear from ~0 over `warmup_epochs`."""

    name: str = "constant"  # constant | cosine | step | plateau
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of optimizer.lr
    step_epochs: int = 10  # step: multiply by `gamma` every `step_epochs`
    gamma: float = 0.1  # step and plateau decay factor
    plateau_patience: int = 3  # plateau: epochs without val mIoU gain before decaying

    def __post_init__(self):
        _require(self.name in SCHEDULES, "name",
                 f"unknown schedule {self.name!r} (valid: {', '.join(SCHEDULES)})")
        _nonneg(self, "warmup_epochs")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio",
                 f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.step_epochs >= 1, "step_epochs", f"must be >= 1, got {self.step_epochs}")
        _require(0.0 < self.gamma <= 1.0, "gamma", f"must be in (0, 1], got {self.gamma}")
        _require(self.plateau_patience >= 1, "plateau_patience",
                 f"must be >= 1, got {self.plateau_patience}")


@dataclass(frozen=True)
class FilterConfig:
    """Which TRAINING images to skip; validation always keeps every image of its fold."""

    max_background: float = 1.0  # skip training images with a larger background fraction
    skip_outliers: bool = False  # skip images flagged as duplicate-mask outliers by prepare

    def __post_init__(self):
        _prob(self, "max_background")


@dataclass(frozen=True)
class SamplingConfig:
    """How an epoch draws the TRAINING images (validation is never resampled).

    factor = 1: each image once, shuffled. Otherwise images holding at least `min_pixels`
    pixels of `rare_class` are drawn `factor` times as often as the others, in an epoch
    of as many draws as training images (`data.sampling.RareClassSampler`).
    """

    rare_class: int = 4  # Big Rock
    factor: float = 1.0
    min_pixels: int = 1

    def __post_init__(self):
        _require(1 <= self.rare_class < NUM_CLASSES, "rare_class",
                 f"must be a labeled class 1..{NUM_CLASSES - 1}, got {self.rare_class}")
        _require(0 < self.factor < float("inf"), "factor",
                 f"must be a finite number > 0, got {self.factor}")
        _require(self.min_pixels >= 1, "min_pixels", f"must be >= 1, got {self.min_pixels}")


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member: trained once per fold."""

    name: str
    model: ModelConfig
    epochs: int = 10
    batch_size: int = 32
    patience: int = 0  # early stopping on val mIoU; 0 = off
    grad_clip: float = 1.0  # max grad norm; 0 = off
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # train-folds --teacher: a test pixel whose pseudo-label the teacher gives with a lower
    # probability is ignored (marked 0, which needs loss.ignore_background)
    pseudo_threshold: float = 0.9
    # train-folds --teacher: false trains this member on the labeled images only, as a run
    # without --teacher does (so one run can hold members with and without pseudo-labels)
    pseudo_labels: bool = True

    def __post_init__(self):
        _require(name_problem(self.name) is None, "name", name_problem(self.name))
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _nonneg(self, "patience", "grad_clip")
        _prob(self, "pseudo_threshold")


@dataclass(frozen=True)
class Recipe:
    name: str
    members: tuple[MemberConfig, ...]
    folds: int = 5
    seed: int = 0
    # seed of the k-fold split when it differs from `seed` (several training seeds, one split)
    split_seed: int | None = None
    description: str = ""

    def __post_init__(self):
        _require(name_problem(self.name) is None, "name", name_problem(self.name))
        _require(len(self.members) > 0, "members", "needs at least one [[members]] entry")
        _require(self.folds >= 2, "folds", f"must be >= 2, got {self.folds}")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(self.split_seed is None or self.split_seed >= 0, "split_seed",
                 f"must be >= 0, got {self.split_seed}")
        seen = set()
        for i, m in enumerate(self.members):
            _require(m.name not in seen, f"members[{i}].name", f"duplicate member name {m.name!r}")
            seen.add(m.name)

    def member(self, name: str) -> MemberConfig:
        for m in self.members:
            if m.name == name:
                return m
        raise InputError(f"recipe {self.name!r} has no member {name!r} "
                         f"(members: {', '.join(m.name for m in self.members)})")


# --- strict parsing ---------------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        (inner, _) = typing.get_args(tp)
        return "an array of tables" if dataclasses.is_dataclass(inner) else "an array of numbers"
    return _TYPE_NAMES.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; nested dataclasses are built recursively."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # `int | None`: TOML has no null
        alts = [a for a in typing.get_args(tp) if a is not type(None)]
        # `str | tuple[float, ...]`: the alternative of the value's TOML kind checks it
        kind = [a for a in alts if isinstance(value, list) == (typing.get_origin(a) is tuple)]
        if len(alts) > 1 and len(kind) == 1 and isinstance(value, list | str):
            alts = kind
        if len(alts) == 1:
            return _convert(value, alts[0], key)
        raise _Bad(key, f"must be {' or '.join(_describe(a) for a in alts)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad(key, "must be a table")
        return _build(tp, value, key)
    if origin is tuple:  # tuple[MemberConfig, ...], tuple[float, ...]
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Bad(key, f"must be {_describe(tp)}")
        return tuple(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Bad(key, "must be a table")
        if vt is Any:
            return dict(value)
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan; no setting means either
            raise _Bad(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp in (int, bool, str):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise _Bad(key, f"must be {_TYPE_NAMES[tp]}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r}")  # pragma: no cover - programming error


def _build(cls, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for k in table:
        if k not in names:
            raise _Bad(f"{prefix}{k}", f"unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in table:
            kwargs[f.name] = _convert(table[f.name], hints[f.name], f"{prefix}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Bad(f"{prefix}{f.name}", "is required")
    try:
        return cls(**kwargs)
    except _Bad as e:
        raise _Bad(f"{prefix}{e.key}", str(e)) from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "args":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_recipe(doc: dict, *, name: str, source: str = "<recipe>",
                 check_models: bool = True) -> Recipe:
    """Build a `Recipe` from a parsed TOML document; InputError names `<source>: <key>`.

    `check_models` builds each member's network once (on CPU) so that an unknown
    model name or a bad argument fails here, before any worker starts.
    """
    doc = dict(doc)
    defaults = doc.pop("defaults", {})
    try:
        if not isinstance(defaults, dict):
            raise _Bad("defaults", "must be a table")
        members = doc.get("members")
        if isinstance(members, list):
            for i, m in enumerate(members):
                if not isinstance(m, dict):
                    raise _Bad(f"members[{i}]", "must be a table")
            doc["members"] = [_deep_merge(defaults, m) for m in members]
        doc.setdefault("name", name)
        recipe = _build(Recipe, doc, "")
    except _Bad as e:
        raise InputError(f"{source}: {e.key}: {e}") from None
    if check_models:
        for i, m in enumerate(recipe.members):
            _check_model(m.model, f"{source}: members[{i}].model")
    return recipe


def _check_model(model: ModelConfig, where: str) -> None:
    from .models.registry import MODELS, build_model

    if model.name not in MODELS:
        raise InputError(f"{where}.name: unknown model {model.name!r} "
                         f"(valid: {', '.join(sorted(MODELS))})")
    try:
        build_model(model.name, **model.args)
    except InputError as e:
        raise InputError(f"{where}.args: {e}") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}.args: {e}") from None


def name_from_file(path: str | Path) -> str:
    """A valid recipe name from a file name: `my recipe.toml` -> `my-recipe`.

    Runs of characters other than letters, digits, '_', '-', '.' become one '-', and
    leading ones are dropped. InputError naming the file when nothing is left.
    """
    stem = Path(path).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("_.-")
    if name_problem(name):
        raise InputError(f"{path}: the file name gives no valid recipe name ({stem!r}); "
                         "rename the file or set name = \"...\" in it")
    return name


def load_recipe(path: str | Path, *, check_models: bool = True) -> Recipe:
    """Read and validate `ensembles/<name>.toml`; the recipe name defaults to the file
    stem made valid (`name_from_file`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read recipe ({e.__class__.__name__})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    name = "?" if "name" in doc else name_from_file(path)  # a written name wins
    return parse_recipe(doc, name=name, source=str(path), check_models=check_models)


def with_epochs(recipe: Recipe, epochs: int | None) -> Recipe:
    """The recipe with every member's epochs set to `epochs` (a training budget; None = as is)."""
    if epochs is None:
        return recipe
    if epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {epochs}")
    members = tuple(dataclasses.replace(m, epochs=epochs) for m in recipe.members)
    return dataclasses.replace(recipe, members=members)
