"""The run folder as one owned, locked and verified thing (issue 11): every bad run folder,
bad data or second writer ends in one line on stderr and exit code 2, with nothing written."""

from __future__ import annotations

import ast
import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _runfolder import make_npz
from typer.testing import CliRunner

from marsseg._io import atomic_path, read_json
from marsseg.cli import app
from marsseg.data import prepare
from marsseg.errors import InputError
from marsseg.orchestrate import RunOptions, train_folds
from marsseg.runfolder import RunFolder
from marsseg.synth import write_synthetic

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

RECIPE = """
folds = {folds}
seed = 5
[[members]]
name = "a"
epochs = {epochs}
batch_size = 16
[members.model]
name = "unet"
args = {{ base_width = 4, depth = 2 }}
[members.filters]
max_background = {max_background}
"""


def recipe_file(folder: Path, folds=2, epochs=1, max_background=1.0, name="r") -> Path:
    p = folder / f"{name}.toml"
    p.write_text(RECIPE.format(folds=folds, epochs=epochs, max_background=max_background))
    return p


def one_line_error(res, *words: str) -> str:
    """Exit 2, a single 'error: ' line on stderr that holds every word, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output, res.output
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_cli(recipe, data, out, *extra):
    return runner.invoke(app, ["train-folds", "--data", str(data), "--recipe", str(recipe),
                               "--out", str(out), "--sequential", "--threads", "1",
                               "--progress", "none", *map(str, extra)])


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A finished 2-fold, 1-epoch run folder (copy it before changing it)."""
    root = tmp_path_factory.mktemp("trained")
    recipe = recipe_file(root)
    train_folds(recipe, shards, root / "run", RunOptions(sequential=True, threads=1,
                                                          progress="none"))
    return recipe, root / "run"


@pytest.fixture
def run(trained, tmp_path):
    recipe, src = trained
    shutil.copytree(src, tmp_path / "run")
    return recipe, tmp_path / "run"


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    write_synthetic(root / "o.npz", 48, 8, seed=99, n_outliers=0)
    prepare(root / "o.npz", root / "shards")
    return root / "shards"


# --- 1. a rerun never launders replaced weights ---------------------------------------------


@pytest.mark.parametrize("replace", ["other fold", "random bytes"])
def test_rerun_refuses_a_finished_fold_whose_weights_changed(shards, run, replace):
    recipe, out = run
    target = out / "a" / "fold_0" / "model.safetensors"
    if replace == "other fold":
        shutil.copyfile(out / "a" / "fold_1" / "model.safetensors", target)
    else:
        target.write_bytes(os.urandom(2000))
    before = snapshot(out)
    res = train_cli(recipe, shards, out)
    one_line_error(res, target, "sha256 differs", "done.json", "a/fold_0")
    assert snapshot(out) == before  # ensemble.json keeps the true sha256
    res = runner.invoke(app, ["predict", "--ensemble", str(out), "--data", str(shards),
                              "--out", str(out.parent / "s.csv"), "-q"])
    one_line_error(res, target)


# --- 2. member weights must be finite numbers -----------------------------------------------


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", '"abc"', "-1", "true"])
@pytest.mark.parametrize("command", ["predict", "evaluate", "select"])
def test_bad_member_weight_names_the_key(shards, run, tmp_path, value, command):
    _, out = run
    text = (out / "ensemble.json").read_text()
    (out / "ensemble.json").write_text(text.replace('"weight": 1.0', f'"weight": {value}', 1))
    before = snapshot(out)
    args = {"predict": ["predict", "--ensemble", str(out), "--data", str(shards), "--out",
                        str(tmp_path / "s.csv"), "-q"],
            "evaluate": ["evaluate", "--ensemble", str(out), "--data", str(shards), "-q"],
            "select": ["select", "--run", str(out)]}[command]
    res = runner.invoke(app, args)
    one_line_error(res, out / "ensemble.json", "members[0].weight")
    assert snapshot(out) == before and not (tmp_path / "s.csv").exists()


# --- 3. run-folder cases that used to end in a traceback ------------------------------------


def test_out_that_is_a_file(shards, tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(train_cli(recipe_file(tmp_path), shards, tmp_path / "f"), tmp_path / "f",
                   "not a folder")
    one_line_error(train_cli(recipe_file(tmp_path), shards, tmp_path / "f" / "run"),
                   tmp_path / "f", "is a file")


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors", "missing", "a/fold_0"]),
    (lambda d: (d / "done.json").write_text("{not json"), ["done.json", "done file is not valid JSON"]),
    (lambda d: (d / "done.json").write_text("[]"), ["done.json", "malformed"]),
])
def test_rerun_with_a_damaged_finished_fold(shards, run, damage, words):
    recipe, out = run
    damage(out / "a" / "fold_0")
    before = snapshot(out)
    one_line_error(train_cli(recipe, shards, out), out / "a" / "fold_0", *words)
    assert snapshot(out) == before


@pytest.mark.parametrize("name, content", [
    ("trainer.json", b"{torn"), ("trainer.json", b'{"epoch": "x"}'),
    ("optimizer.bin", b"not a torch file"),
])
def test_rerun_with_a_corrupt_saved_state(shards, run, name, content):
    recipe, out = run
    fold = out / "a" / "fold_1"
    (fold / "done.json").unlink()  # an interrupted fold: state/ but no done.json
    (fold / "state" / name).write_bytes(content)
    before = snapshot(out)
    one_line_error(train_cli(recipe, shards, out), fold / "state" / name, "delete")
    assert snapshot(out) == before


def test_resume_of_an_interrupted_fold_still_works(shards, run):
    recipe, out = run
    done = json.loads((out / "a" / "fold_1" / "done.json").read_text())
    (out / "a" / "fold_1" / "done.json").unlink()
    res = train_cli(recipe, shards, out)
    assert res.exit_code == 0, res.output
    again = json.loads((out / "a" / "fold_1" / "done.json").read_text())
    assert again["sha256"] == done["sha256"] and again["best_epoch"] == done["best_epoch"]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def unprivileged():
    """Permission checks as for a normal user: root drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from this thread's effective set (it still owns its files)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(hdr), data) != 0:
        pytest.skip("cannot read this thread's capabilities")
    effective = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2))
    if libc.capset(ctypes.byref(hdr), data) != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE")
    try:
        yield
    finally:
        data[0].effective = effective
        assert libc.capset(ctypes.byref(hdr), data) == 0


@pytest.fixture
def read_only(run, shards, tmp_path):
    """A read-only copy of the run, an empty read-only folder, and the shards."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    run[1].chmod(0o555)
    yield run[0], run[1], ro
    ro.chmod(0o755)
    run[1].chmod(0o755)


def test_read_only_places(read_only, shards):
    recipe, out, ro = read_only
    before = snapshot(out)
    with unprivileged():
        with pytest.raises(PermissionError):
            (ro / "probe").touch()
        one_line_error(train_cli(recipe, shards, ro / "run"), ro / "run", "cannot")
        one_line_error(train_cli(recipe, shards, ro), ro, "cannot write")
        one_line_error(runner.invoke(app, ["select", "--run", str(out)]), out, "cannot write")
        one_line_error(runner.invoke(app, ["evaluate", "--ensemble", str(out), "--data",
                                           str(shards), "-q", "--no-tta"]), out, "cannot write")
        one_line_error(runner.invoke(app, ["report", "--ensemble", str(out), "--out", str(ro)]),
                       ro, "cannot write")
    assert snapshot(out) == before and not list(ro.iterdir())


# --- 4. the lock ------------------------------------------------------------------------------


def test_second_train_folds_stops_at_once_and_a_dead_holders_lock_is_taken_over(shards, tmp_path,
                                                                                real_cli):
    recipe = recipe_file(tmp_path, epochs=200)
    out = tmp_path / "run"
    first = real_cli.start(["train-folds", "--data", shards, "--recipe", recipe, "--out", out,
                            "--sequential", "--threads", "1", "--progress", "none"],
                           stdout=subprocess.DEVNULL)
    lock = out / "a" / "fold_0" / ".lock"
    try:
        end = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text()):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < end, "the first train-folds never locked its fold"
            time.sleep(0.1)
        t0 = time.monotonic()
        res = train_cli(recipe, shards, out)
        assert time.monotonic() - t0 < 30
        one_line_error(res, out, f"pid {first.pid}", socket.gethostname(), "a/fold_0")
    finally:
        first.kill()
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid  # left behind by kill -9
    with RunFolder(out).lock_folds([("a", 0), ("a", 1)]):  # taken over at once
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.read_text() == ""


def test_run_lock_waits_then_names_the_holder(tmp_path):
    run = RunFolder(tmp_path / "run")
    code = ("import sys, time; from marsseg.runfolder import RunFolder\n"
            f"with RunFolder({str(run.path)!r}).lock(): print('in', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"in"
        with pytest.raises(InputError, match=re.escape(f"run folder {run.path} is in use by "
                                                        f"pid {holder.pid} on host")):
            with run.lock(wait=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run.lock(wait=0):
        pass


# --- 5. the data a run was made from ----------------------------------------------------------


def test_other_data_is_refused(run, other_shards, tmp_path):
    recipe, out = run
    before = snapshot(out)
    one_line_error(train_cli(recipe, other_shards, out, "--folds", "1"), other_shards,
                   "not the data this run folder was made from", out / "data.json")
    one_line_error(runner.invoke(app, ["select", "--run", str(out), "--data", str(other_shards)]),
                   other_shards, "not the data")
    one_line_error(runner.invoke(app, ["evaluate", "--ensemble", str(out), "--data",
                                       str(other_shards), "--split", "train", "-q"]),
                   other_shards, "not the data")
    assert snapshot(out) == before


def test_an_edited_shard_is_named(shards, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    raw = bytearray((data / "train-001.h5").read_bytes())
    raw[-100] ^= 0xFF  # pixel bytes: still a readable HDF5 file
    (data / "train-001.h5").write_bytes(bytes(raw))
    res = train_cli(recipe_file(tmp_path), data, tmp_path / "run")
    one_line_error(res, data / "train-001.h5", "sha256 differs")
    assert not (tmp_path / "run").exists()

def test_an_edited_test_shard_is_named_by_predict(trained, shards, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    raw = bytearray((data / "test-000.h5").read_bytes())
    raw[-100] ^= 0xFF
    (data / "test-000.h5").write_bytes(bytes(raw))
    res = runner.invoke(app, ["predict", "--ensemble", str(trained[1]), "--data", str(data),
                              "--out", str(tmp_path / "s.csv"), "-q"])
    one_line_error(res, data / "test-000.h5", "sha256 differs")
    assert not (tmp_path / "s.csv").exists()


def test_data_is_recorded(trained, shards):
    rec = json.loads((trained[1] / "data.json").read_text())
    info = json.loads((shards / "dataset.json").read_text())
    assert rec["path"] == str(shards.resolve())
    assert [s["sha256"] for s in rec["train_shards"]] == \
        [s["sha256"] for s in info["splits"]["train"]["shards"]]
    assert len(rec["dataset_sha256"]) == 64


# --- 6. every check before anything is written ----------------------------------------------


@pytest.fixture(scope="module")
def background_everywhere(tmp_path_factory):
    """Shards where every training image holds some background."""
    root = tmp_path_factory.mktemp("bg")
    make_npz(root / "bg.npz", n_train=24, n_test=4)
    prepare(root / "bg.npz", root / "shards")
    return root / "shards"


@pytest.mark.parametrize("recipe_kw, extra, words", [
    ({"folds": 1000}, [], ["k=1000", "groups"]),
    ({"max_background": 0.0}, [], ["filters leave no training images"]),
    ({}, ["--gpus-per-task", "1", "--precision", "bf16"], ["--gpus-per-task 1", "0 GPUs"]),
])
def test_bad_request_writes_nothing_and_the_fix_then_runs(shards, background_everywhere, tmp_path,
                                                          recipe_kw, extra, words):
    import ray

    if "max_background" in recipe_kw:
        shards = background_everywhere
    out = tmp_path / "run"
    # (no --sequential: resources are checked for Ray tasks)
    res = runner.invoke(app, ["train-folds", "--data", str(shards), "--recipe",
                              str(recipe_file(tmp_path, **recipe_kw)), "--out", str(out),
                              "--progress", "none", *extra])
    one_line_error(res, *words)
    assert not out.exists() and not ray.is_initialized()
    if recipe_kw:  # the corrected recipe on the same --out
        res = train_cli(recipe_file(tmp_path), shards, out, "--folds", "0")
        assert res.exit_code == 0, res.output


# --- the one owner and the one atomic writer --------------------------------------------------


def test_run_folder_names_are_spelled_in_runfolder_only():
    names = ("fold_", "model.safetensors", "ensemble.json", "oof.h5", "metrics.jsonl",
             "splits.json", "done.json")
    found = {}
    for path in [*(REPO / "marsseg").rglob("*.py"), *(REPO / "cli").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docs:
                for n in names:
                    if n in node.value:
                        found.setdefault(n, set()).add(path.relative_to(REPO).as_posix())
    assert found and all(v == {"marsseg/runfolder.py"} for v in found.values()), found


def test_atomic_path(tmp_path):
    target = tmp_path / "f.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("two")
        raise KeyboardInterrupt
    assert target.read_text() == "one" and sorted(tmp_path.iterdir()) == [target]
    folder = tmp_path / "d"
    for text in ("a", "b"):  # a folder replaces a folder
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(text)
    assert (folder / "x").read_text() == "b" and sorted(tmp_path.iterdir()) == [folder, target]


def test_read_json_is_the_one_reader_of_json_records(tmp_path):
    """read_json: None for a missing file, one line naming file and record otherwise; and no
    other module parses a JSON file by hand with its own error message."""
    p = tmp_path / "r.json"
    assert read_json(p, "thing") is None
    p.write_text('{"a": [1, 2]}')
    assert read_json(p, "thing") == {"a": [1, 2]}
    p.write_text("{")
    with pytest.raises(InputError, match=r"r\.json: thing is not valid JSON \(.*\); delete it$"):
        read_json(p, "thing", "delete it")
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match=r"r\.json: cannot read thing \(UnicodeDecodeError"):
        read_json(p, "thing")
    own = [f.relative_to(REPO).as_posix() for f in sorted((REPO / "marsseg").rglob("*.py"))
           if "not valid JSON" in f.read_text() and f.name != "_io.py"]
    assert own == [], own
