"""Student recipes (`ensembles/student.toml`): one member plus how it learns from its teacher.

A student recipe is an ordinary recipe with exactly one ``[[members]]`` table, whose
``model`` may be left out (then it is the teacher's strongest member, same width), and an
optional ``[distill]`` table (`DistillConfig`). The folds and split come from the teacher;
the recipe's own ``folds`` is not used. Parsed as strictly as every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import (
    ModelConfig,
    Recipe,
    _Bad,
    _build,
    _nonneg,
    _prob,
    _require,
    name_from_file,
    parse_recipe,
    tomllib,
)
from .errors import InputError

UNLABELED_WEIGHTING = ("confidence", "disagreement")


@dataclass(frozen=True)
class DistillConfig:
    """How a student learns from its teacher: the [distill] table of a student recipe."""

    hard_weight: float = 1.0  # the member's own loss on the labeled masks
    soft_weight: float = 1.0  # KL to the teacher's out-of-fold probabilities (labeled images)
    temperature: float = 2.0  # of both KL terms, which are scaled by T^2
    unlabeled_weight: float = 1.0  # KL to the teacher's TTA probabilities (unlabeled images)
    # per unlabeled pixel: confidence = the teacher's top probability as weight;
    # disagreement = 1 where at most max_disagreement of the teacher's models differ, else 0
    unlabeled_weighting: str = "confidence"
    max_disagreement: float = 0.1
    # unlabeled images per step; 0 = in proportion to the unlabeled / labeled image counts
    unlabeled_batch_size: int = 0

    def __post_init__(self):
        _nonneg(self, "hard_weight", "soft_weight", "unlabeled_weight", "unlabeled_batch_size")
        _require(self.hard_weight + self.soft_weight > 0, "hard_weight",
                 "hard_weight and soft_weight are both 0: the labeled images would teach nothing")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(self.unlabeled_weighting in UNLABELED_WEIGHTING, "unlabeled_weighting",
                 f"must be one of {', '.join(UNLABELED_WEIGHTING)}, got "
                 f"{self.unlabeled_weighting!r}")
        _prob(self, "max_disagreement")


def load_student(path: str | Path, model: ModelConfig) -> tuple[Recipe, DistillConfig]:
    """A student recipe: one [[members]] entry (its model defaults to `model`, the teacher's
    strongest) plus an optional [distill] table. InputError names `<file>: <key>`."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read recipe ({e.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    table = doc.pop("distill", {})
    try:
        if not isinstance(table, dict):
            raise _Bad("distill", "must be a table")
        distill = _build(DistillConfig, table, "distill")
        members = doc.get("members")
        if not isinstance(members, list) or len(members) != 1 or not isinstance(members[0], dict):
            raise _Bad("members", "a student recipe has exactly one [[members]] table")
        defaults = doc.get("defaults", {})
        if "model" not in members[0] and not (isinstance(defaults, dict) and "model" in defaults):
            members[0]["model"] = {"name": model.name, "args": dict(model.args)}
    except _Bad as e:
        raise InputError(f"{path}: {e.key}: {e}") from None
    name = "?" if "name" in doc else name_from_file(path)
    recipe = parse_recipe(doc, name=name, source=str(path))
    if recipe.members[0].sampling.factor != 1.0:  # the taught loader streams its own order
        raise InputError(f"{path}: members[0].sampling: a student recipe trains on the "
                         "teacher's targets in a plain shuffle; remove [members.sampling]")
    return recipe, distill
