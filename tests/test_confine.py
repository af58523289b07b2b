"""Names stay inside their folder and outputs apart from inputs (issue 19), as pure path
rules: what is refused, and what stays allowed (a new file beside a run's own files)."""

from __future__ import annotations

import pytest

from marsseg._io import inside, valid_name
from marsseg.confine import check_apart
from marsseg.errors import InputError


@pytest.mark.parametrize("name, ok", [("a", True), ("unet-se_2.b", True), ("a\n", False),
                                      ("..", False), (".a", False), ("a/b", False),
                                      ("/etc", False), ("", False), ("a\x00", False),
                                      (7, False)])
def test_the_name_rule_is_a_full_match(name, ok):
    assert valid_name(name) is ok


def test_inside_refuses_dotdot_absolute_and_links_out(tmp_path):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    assert inside(tmp_path / "run", "a/fold_0", "x") == tmp_path / "run" / "a" / "fold_0"
    for bad in ("../other", "/etc", "a/../../other", "a\n"):
        with pytest.raises(InputError, match="is not a name inside"):
            inside(tmp_path / "run", bad, "x")
    (tmp_path / "run" / "link").symlink_to(tmp_path / "other")
    with pytest.raises(InputError, match="leads outside"):
        inside(tmp_path / "run", "link", "x")
    (tmp_path / "run" / "inner").symlink_to(tmp_path / "run" / "a")  # stays inside: fine
    assert inside(tmp_path / "run", "inner", "x").name == "inner"


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    (run / "a" / "fold_0").mkdir(parents=True)
    (run / "a" / "fold_0" / "model.safetensors").write_bytes(b"w")
    (run / "a" / "fold_0" / "config.json").write_text("{}")
    (run / "ensemble.json").write_text("{}")
    return run


@pytest.mark.parametrize("out", ["ensemble.json", "scores.json", "splits.json", ".lock",
                                 "a/fold_0/model.safetensors", "a/fold_0/s.csv", "a/x.csv",
                                 "a/fold_0/cache/x.xml", ""])
def test_run_folder_files_are_refused(run, out):
    with pytest.raises(InputError, match="--out would overwrite"):
        check_apart(run / out if out else run, "--out", run=run)


@pytest.mark.parametrize("out", ["submission.csv", "report", "probs.h5"])
def test_new_files_beside_the_runs_own_are_allowed(run, out):
    assert check_apart(run / out, "--out", run=run) is None  # no InputError


def test_a_single_fold_folder_is_refused_whole(run):
    fold = run / "a" / "fold_0"
    with pytest.raises(InputError):
        check_apart(fold / "new.csv", "--out", run=fold)


def test_links_are_followed_and_data_is_an_input(tmp_path, run):
    (tmp_path / "link.csv").symlink_to(run / "ensemble.json")
    with pytest.raises(InputError):
        check_apart(tmp_path / "link.csv", "--out", run=run)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="shard folder"):
        check_apart(shards / "new.csv", "--out", data=shards)
    npz = tmp_path / "d.npz"
    npz.write_bytes(b"x")
    with pytest.raises(InputError):
        check_apart(npz, "--out", data=npz)
    check_apart(tmp_path / "s.csv", "--out", run=run, data=shards)  # elsewhere: fine
