"""Recipe parsing: strict keys and types, errors that name the key, shipped recipes load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from marsseg.config import Recipe, load_recipe, parse_recipe
from marsseg.device import resolve_training
from marsseg.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def doc(**member) -> dict:
    m = {"name": "a", "model": {"name": "unet", "args": {"base_width": 4, "depth": 2}}}
    m.update(member)
    return {"folds": 2, "seed": 1, "members": [m]}


def parse(d: dict, **kw) -> Recipe:
    return parse_recipe(d, name="t", source="r.toml", **kw)


def error_of(d: dict, **kw) -> str:
    with pytest.raises(InputError) as e:
        parse(d, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("path", sorted((ROOT / "ensembles").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    if path.stem.startswith("student"):  # a student recipe (distill): its model may be absent
        from marsseg.config import ModelConfig
        from marsseg.student import load_student

        r, _ = load_student(path, ModelConfig("unet-res", {"base_width": 4, "depth": 2}))
    else:
        r = load_recipe(path)
    assert r.name == path.stem and r.members and r.folds >= 2


def test_student_ablations_differ_from_student_in_one_distill_setting():
    from marsseg.config import ModelConfig
    from marsseg.student import load_student

    m = ModelConfig("unet-res", {"base_width": 4, "depth": 2})
    base = load_student(ROOT / "ensembles" / "student.toml", m)[1]
    for name, key, value in (("student-t1", "temperature", 1.0), ("student-t4", "temperature", 4.0),
                             ("student-disagree", "unlabeled_weighting", "disagreement")):
        d = load_student(ROOT / "ensembles" / f"{name}.toml", m)[1]
        changed = {k for k in vars(base) if getattr(base, k) != getattr(d, k)}
        assert changed == {key} and getattr(d, key) == value, name


def test_ladder_adds_one_ingredient_per_step():
    r = {n: load_recipe(ROOT / "ensembles" / f"{n}.toml").members[0]
         for n in ("seed-unet1", "seed-unet2", "seed-unet3", "seed-unet4", "seed-final")}
    assert r["seed-unet1"].model.name == "unet" and r["seed-unet1"].augment.cutmix == 0
    assert r["seed-unet2"].model.name == "unet-se" and r["seed-unet2"].augment.cutmix > 0
    assert r["seed-unet2"].augment.hflip > 0 and r["seed-unet2"].loss.class_weights == "none"
    assert r["seed-unet3"].loss.class_weights != "none" and not r["seed-unet3"].loss.ignore_background
    assert r["seed-unet4"].loss.ignore_background and r["seed-unet4"].augment.rock_target == 0
    assert r["seed-final"].augment.rock_paste == pytest.approx(0.5)
    assert r["seed-final"].schedule.name == "cosine"


def test_defaults_and_frozen():
    r = parse(doc())
    m = r.members[0]
    assert m.epochs == 10 and m.loss.terms == {"ce": 1.0} and m.filters.max_background == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.epochs = 3
    assert r == parse(doc())


def test_defaults_table_is_merged_under_members():
    d = doc()
    d["defaults"] = {"epochs": 4, "optimizer": {"lr": 0.01, "name": "sgd"}}
    d["members"][0]["optimizer"] = {"lr": 0.1}
    m = parse(d).members[0]
    assert m.epochs == 4 and m.optimizer.name == "sgd" and m.optimizer.lr == 0.1


@pytest.mark.parametrize("member, key", [
    ({"epochz": 3}, "members[0].epochz"),
    ({"loss": {"terms": {"ce": 1.0}, "weights": "x"}}, "members[0].loss.weights"),
    ({"augment": {"rotate": 0.5}}, "members[0].augment.rotate"),
    ({"sampling": {"class_balanced": 4}}, "members[0].sampling.class_balanced"),
])
def test_unknown_key_named(member, key):
    msg = error_of(doc(**member))
    assert msg.startswith(f"r.toml: {key}: unknown key")


def test_unknown_top_level_key():
    d = doc()
    d["fold"] = 3
    assert error_of(d).startswith("r.toml: fold: unknown key")


@pytest.mark.parametrize("member, key", [
    ({"epochs": -1}, "members[0].epochs"),
    ({"epochs": 0}, "members[0].epochs"),
    ({"epochs": "3"}, "members[0].epochs"),
    ({"epochs": 2.5}, "members[0].epochs"),
    ({"epochs": True}, "members[0].epochs"),
    ({"batch_size": 0}, "members[0].batch_size"),
    ({"augment": {"hflip": 1.5}}, "members[0].augment.hflip"),
    ({"augment": {"cutmix": "yes"}}, "members[0].augment.cutmix"),
    ({"loss": {"terms": {"tversky": 1.0}}}, "members[0].loss.terms.tversky"),
    ({"loss": {"class_weights": "median"}}, "members[0].loss.class_weights"),
    ({"loss": {"class_weights": 3}}, "members[0].loss.class_weights"),
    ({"loss": {"class_weights": [1, 2, 3]}}, "members[0].loss.class_weights"),
    ({"loss": {"class_weights": [0, 0, 0, 0, 0]}}, "members[0].loss.class_weights"),
    ({"loss": {"class_weights": [0, 1, "x", 1, 1]}}, "members[0].loss.class_weights[2]"),
    ({"loss": {"class_scale": [1, 1, 1, 1, -2]}}, "members[0].loss.class_scale[4]"),
    ({"loss": {"class_scale": [1, 1, 1, 1, float("inf")]}}, "members[0].loss.class_scale[4]"),
    ({"loss": {"class_scale": 2.0}}, "members[0].loss.class_scale"),
    ({"loss": {"class_scale": [2.0]}}, "members[0].loss.class_scale"),
    ({"sampling": {"factor": 0}}, "members[0].sampling.factor"),
    ({"sampling": {"factor": "3"}}, "members[0].sampling.factor"),
    ({"sampling": {"rare_class": 0}}, "members[0].sampling.rare_class"),
    ({"sampling": {"rare_class": 5}}, "members[0].sampling.rare_class"),
    ({"sampling": {"rare_class": 4.0}}, "members[0].sampling.rare_class"),
    ({"sampling": {"min_pixels": 0}}, "members[0].sampling.min_pixels"),
    ({"sampling": 3}, "members[0].sampling"),
    ({"loss": {"ignore_background": 1}}, "members[0].loss.ignore_background"),
    ({"optimizer": {"name": "adam"}}, "members[0].optimizer.name"),
    ({"optimizer": {"lr": -0.1}}, "members[0].optimizer.lr"),
    ({"schedule": {"name": "onecycle"}}, "members[0].schedule.name"),
    ({"filters": {"max_background": 2}}, "members[0].filters.max_background"),
    ({"name": "a b"}, "members[0].name"),
    ({"model": "unet"}, "members[0].model"),
])
def test_bad_values_named(member, key):
    assert error_of(doc(**member)).startswith(f"r.toml: {key}:")


def test_missing_model_and_duplicate_names():
    d = doc()
    del d["members"][0]["model"]
    assert error_of(d).startswith("r.toml: members[0].model: is required")
    d = doc()
    d["members"].append(dict(d["members"][0]))
    assert "duplicate member name" in error_of(d)
    assert "members" in error_of({"folds": 2})
    assert error_of({**doc(), "folds": 1}).startswith("r.toml: folds:")


def test_unknown_model_and_bad_model_arg():
    msg = error_of(doc(model={"name": "unet9"}))
    assert msg.startswith("r.toml: members[0].model.name: unknown model 'unet9'") and "unet-se" in msg
    msg = error_of(doc(model={"name": "unet", "args": {"widht": 4}}))
    assert msg.startswith("r.toml: members[0].model.args:") and "widht" in msg
    parse(doc(model={"name": "unet9"}), check_models=False)  # structure alone is fine


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("folds = [\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_recipe(p)


def test_fp16_is_gpu_only():
    with pytest.raises(InputError, match="GPU-only"):
        resolve_training("fp16", gpus=0)
    resolve_training("fp16", gpus=0.5)
    resolve_training("bf16", gpus=0)
    with pytest.raises(InputError, match="--precision"):
        resolve_training("fp8", gpus=1)


@pytest.mark.parametrize("terms", [{"ce": 0.0}, {"ce": 0.0, "dice": 0.0}])
def test_all_zero_loss_weights_are_refused_naming_the_key(terms):
    msg = error_of(doc(loss={"terms": terms}))
    assert msg.startswith("r.toml: members[0].loss.terms:") and "weight is 0" in msg


def test_lever_keys_parse_and_default_to_what_recipes_had():
    m = parse(doc()).members[0]
    assert m.loss.class_scale == () and m.sampling.factor == 1.0 and m.sampling.rare_class == 4
    m = parse(doc(loss={"terms": {"focal": 1.0, "lovasz": 0.5}, "class_weights": [0, 1, 1, 1, 4],
                        "class_scale": [1, 1, 1, 1, 2]},
                  sampling={"factor": 3, "min_pixels": 5})).members[0]
    assert m.loss.terms == {"focal": 1.0, "lovasz": 0.5}
    assert m.loss.class_weights == (0.0, 1.0, 1.0, 1.0, 4.0)
    assert m.loss.class_scale == (1.0, 1.0, 1.0, 1.0, 2.0)
    assert m.sampling.factor == 3.0 and m.sampling.min_pixels == 5
    # a method name still parses as before, beside an explicit list
    assert parse(doc(loss={"class_weights": "inverse"})).members[0].loss.class_weights == "inverse"


def test_one_zero_term_beside_a_positive_one_is_fine():
    assert parse(doc(loss={"terms": {"ce": 1.0, "dice": 0.0}})).members[0].loss.terms["dice"] == 0


def _recipe_file(tmp_path, file_name, extra=""):
    p = tmp_path / file_name
    p.write_text(extra + 'folds = 2\n[[members]]\nname = "a"\n'
                 '[members.model]\nname = "unet"\nargs = { base_width = 4, depth = 2 }\n')
    return p


@pytest.mark.parametrize("file_name, name", [("my recipe.toml", "my-recipe"),
                                             ("  v2 (final)!.toml", "v2-final"),
                                             ("ok_name.v1.toml", "ok_name.v1")])
def test_recipe_name_is_derived_from_any_file_name(tmp_path, file_name, name):
    assert load_recipe(_recipe_file(tmp_path, file_name), check_models=False).name == name


def test_a_file_name_with_nothing_usable_names_the_file(tmp_path):
    p = _recipe_file(tmp_path, "ü ü.toml")
    with pytest.raises(InputError, match="file name gives no valid recipe name"):
        load_recipe(p, check_models=False)
    # a name written in the file wins over the file name
    q = _recipe_file(tmp_path, "ü.toml", 'name = "fine"\n')
    assert load_recipe(q, check_models=False).name == "fine"


def test_a_bad_name_written_in_the_file_names_the_key(tmp_path):
    p = _recipe_file(tmp_path, "x.toml", 'name = "my recipe"\n')
    with pytest.raises(InputError, match=r"x\.toml: name: 'my recipe' is not a valid name"):
        load_recipe(p, check_models=False)
