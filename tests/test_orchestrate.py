"""train-folds: sequential and Ray runs, skipping finished folds, a worker killed mid-fold,
and CLI errors that stop before Ray starts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from marsseg._cores import CoreShare, share_threads
from marsseg.cli import app
from marsseg.errors import InputError
from marsseg.models.registry import load_pretrained
from marsseg.orchestrate import RunOptions, train_folds

runner = CliRunner()

RECIPE = """
folds = 2
seed = 5
[[members]]
name = "{name}"
epochs = {epochs}
batch_size = 16
[members.model]
name = "unet"
args = {{ base_width = 4, depth = 2 }}
[members.augment]
hflip = 0.5
cutmix = 0.5
[members.filters]
skip_outliers = true
"""


def write_recipe(tmp_path, text=None, name="r", **kw) -> object:
    p = tmp_path / f"{name}.toml"
    p.write_text(text if text is not None else RECIPE.format(**{"name": "a", "epochs": 2, **kw}))
    return p


def two_members(tmp_path):
    member = "[[members]]" + RECIPE.split("[[members]]")[1]
    text = RECIPE.format(name="a", epochs=1) + member.format(name="b", epochs=1)
    return write_recipe(tmp_path, text, name="two")


def weights(run, member, fold):
    return load_file(str(run / member / f"fold_{fold}" / "model.safetensors"))


def test_sequential_run_writes_ensemble_and_rerun_skips(shards, tmp_path):
    recipe = two_members(tmp_path)
    out = tmp_path / "run"
    opts = RunOptions(sequential=True, threads=1, progress="none")
    ens = train_folds(recipe, shards, out, opts)
    assert sorted(ens["trained"]) == ["a/fold_0", "a/fold_1", "b/fold_0", "b/fold_1"]
    on_disk = json.loads((out / "ensemble.json").read_text())
    assert on_disk["format_version"] == 1 and on_disk["k"] == 2 and on_disk["recipe"] == "two"
    assert on_disk["selected"] == ["a", "b"] and on_disk["data"] == str(shards.resolve())
    for m in on_disk["members"]:
        assert m["weight"] == 1.0 and 0 <= m["oof_miou"] <= 1 and len(m["oof_iou"]) == 5
        assert [f["fold"] for f in m["folds"]] == [0, 1]
        for f in m["folds"]:
            assert len(f["sha256"]) == 64 and (out / f["path"] / "done.json").is_file()
    assert 0 <= on_disk["oof_miou_ensemble"] <= 1
    assert (out / "splits.json").is_file() and (out / "recipe.toml").read_text() == recipe.read_text()

    # `select` may edit weights in ensemble.json: a rerun that trains nothing keeps the file
    on_disk["members"][1]["weight"] = 0.0
    (out / "ensemble.json").write_text(json.dumps(on_disk))
    t0 = time.perf_counter()
    again = train_folds(recipe, shards, out, opts)
    assert again["trained"] == [] and time.perf_counter() - t0 < 10
    assert again["oof_miou_ensemble"] == on_disk["oof_miou_ensemble"]
    assert json.loads((out / "ensemble.json").read_text()) == on_disk


def test_selection_and_changed_recipe(shards, tmp_path):
    recipe = two_members(tmp_path)
    out = tmp_path / "run"
    opts = RunOptions(sequential=True, threads=1, progress="none", members=("b",), folds=(1,))
    ens = train_folds(recipe, shards, out, opts)
    assert ens["trained"] == ["b/fold_1"] and ens["members"][0]["oof_miou"] is None
    assert not (out / "a").exists()
    with pytest.raises(InputError, match="no member 'c'"):
        train_folds(recipe, shards, out, RunOptions(sequential=True, members=("c",)))
    with pytest.raises(InputError, match="out of range"):
        train_folds(recipe, shards, out, RunOptions(sequential=True, folds=(2,)))
    other = write_recipe(tmp_path, name="two", epochs=5)
    with pytest.raises(InputError, match="different recipe"):
        train_folds(other, shards, out, RunOptions(sequential=True))


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace("batch_size = 16", "batch_size = 16\nbatchsize = 3"), "batchsize"),
    (lambda t: t.replace('name = "unet"', 'name = "unet9"'), "unet9"),
    (lambda t: t.replace("epochs = 2", "epochs = -3"), "epochs"),
])
def test_cli_bad_recipe_exits_2_before_ray(shards, tmp_path, edit, words):
    import ray

    p = write_recipe(tmp_path)
    p.write_text(edit(p.read_text()))
    res = runner.invoke(app, ["train-folds", "--data", str(shards), "--recipe", str(p),
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert str(p) in lines[0] and "Traceback" not in res.output
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_cli_fp16_on_cpu_exits_2(shards, tmp_path):
    res = runner.invoke(app, ["train-folds", "--data", str(shards), "--recipe",
                              str(write_recipe(tmp_path)), "--out", str(tmp_path / "run"),
                              "--precision", "fp16"])
    assert res.exit_code == 2 and "GPU-only" in res.stderr and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize("extra, words", [
    ([], "Ray could not start a local node (Exception: The current node timed out during "
         "startup."),
    (["--address", "auto"], "Ray could not join the cluster at auto (Exception:"),
])
def test_cli_ray_start_failure_is_one_line_exit_1(shards, tmp_path, ray_start_fails, extra,
                                                  words):
    res = runner.invoke(app, ["train-folds", "--data", str(shards), "--recipe",
                              str(write_recipe(tmp_path)), "--out", str(tmp_path / "run"),
                              "--progress", "none", *extra])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert lines[0].endswith("or give --sequential to train in this process"), lines[0]
    assert "Traceback" not in res.output and ray_start_fails == [extra[-1] if extra else "local"]


def test_share_threads_gives_idle_cores_to_running_folds():
    assert [share_threads(2, n, 1) for n in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert [share_threads(16, n, 2) for n in (1, 3, 8, 16)] == [16, 5, 2, 2]


def test_two_clusters_on_one_machine_share_no_folder():
    """Every fresh Ray cluster numbers its first job 01000000: the folder also names the
    node (a new id with every raylet), so two runs with their own local clusters on one
    machine do not count each other's folds."""
    from marsseg._cores import share_folder

    job = "01000000"
    assert share_folder(job, "a" * 56) != share_folder(job, "b" * 56)
    assert share_folder(job, "a" * 56) == share_folder(job, "a" * 56)
    assert share_folder("02000000", "a" * 56) != share_folder(job, "a" * 56)


def test_core_share_counts_live_folds_of_its_folder(tmp_path):
    folder = tmp_path / "job"
    with CoreShare(folder, "a/fold_0", 4, 1) as a:
        assert a.threads() == 4  # alone on the node
        with CoreShare(folder, "a/fold_1", 4, 1) as b:
            assert a.threads() == b.threads() == 2
            (folder / "a-fold_2@99999999").touch()  # a killed task's marker: not counted
            assert a.threads() == 2 and not (folder / "a-fold_2@99999999").exists()
        assert a.threads() == 4
        other = CoreShare(tmp_path / "other-job", "a-fold_0", 4, 1)
        assert other.threads() == 4  # another job's folds are not counted
    assert not folder.exists()  # the last fold out removes the folder
    with CoreShare(folder, "a-fold_0", 2, 3) as c:
        assert c.threads() == 3  # never below the task's own threads
    (tmp_path / "file").write_text("")
    with CoreShare(tmp_path / "file" / "job", "a/fold_0", 4, 1) as d:
        assert d.threads() == 1  # no folder to count in: the task's own threads


# --- Ray -----------------------------------------------------------------------------------




@pytest.mark.slow
def test_ray_fold_equals_sequential_fold(shards, tmp_path, local_ray):
    recipe = write_recipe(tmp_path)
    seq = train_folds(recipe, shards, tmp_path / "seq",
                      RunOptions(sequential=True, threads=1, folds=(0,), progress="none"))
    par = train_folds(recipe, shards, tmp_path / "ray",
                      RunOptions(threads=1, folds=(0,), progress="plain"))
    assert seq["trained"] == par["trained"] == ["a/fold_0"]
    a, b = weights(tmp_path / "seq", "a", 0), weights(tmp_path / "ray", "a", 0)
    for k in a:  # same code, seed and thread count: bit-identical on CPU
        assert a[k].equal(b[k]), k


@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes(shards, tmp_path, local_ray):
    recipe = write_recipe(tmp_path, epochs=8)
    out = tmp_path / "run"
    metrics = out / "a" / "fold_0" / "metrics.jsonl"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            try:
                rows = [json.loads(x) for x in metrics.read_text().splitlines()]
            except (FileNotFoundError, json.JSONDecodeError):
                rows = []
            if len(rows) >= 2:
                pid = rows[-1]["worker"]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, rows[-1]["epoch"]))
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    ens = train_folds(recipe, shards, out,
                      RunOptions(threads=1, folds=(0,), max_retries=2, progress="plain"))
    t.join(5)
    assert killed, "the fold finished before the worker could be killed"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(8))  # no epoch trained twice
    pids = [r["worker"]["pid"] for r in rows]
    dead_pid, dead_epoch = killed[0]
    assert dead_pid in pids and len(set(pids)) == 2  # the retry is another worker process
    first_new = pids.index(next(p for p in pids if p != dead_pid))
    assert rows[first_new].get("resumed") is True and first_new >= dead_epoch
    assert ens["trained"] == ["a/fold_0"]
    model = load_pretrained(out / "a" / "fold_0")
    assert model.marsseg_name == "unet"


@pytest.mark.slow
def test_resources_the_cluster_lacks_are_an_input_error(shards, tmp_path, local_ray):
    with pytest.raises(InputError, match="has 0 GPUs"):
        train_folds(write_recipe(tmp_path), shards, tmp_path / "run",
                    RunOptions(gpus_per_task=1, precision="bf16", progress="none"))
    assert not (tmp_path / "run" / "a").exists()


@pytest.mark.slow
def test_embedded_ray_workers_are_not_niced(local_ray):
    # Ray's default worker niceness 15 would starve Ray folds next to --sequential ones; a
    # worker runs at the driver's own niceness (a test run under `nice` is not an error)
    assert local_ray.get(local_ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)


@pytest.mark.slow
def test_running_folds_take_over_the_cores_of_finished_ones(shards, tmp_path, local_ray):
    total = int(local_ray.cluster_resources()["CPU"])
    if total < 2:
        pytest.skip("needs 2 CPUs")
    # Tasks of half the CPUs: two folds run at once, the third alone once they finish.
    recipe = write_recipe(tmp_path, RECIPE.replace("folds = 2", "folds = 3").format(name="a", epochs=5))
    out = tmp_path / "run"
    train_folds(recipe, shards, out, RunOptions(cpus_per_task=total / 2, progress="none"))
    base = max(1, int(total / 2))
    rows = {f: [json.loads(x) for x in (out / "a" / f"fold_{f}" / "metrics.jsonl").read_text().splitlines()]
            for f in range(3)}
    seen = [r["threads"] for f in rows for r in rows[f]]
    assert set(seen) == {base, total}, seen
    # Never more folds at once than the CPUs hold (a blocking call inside a task lets Ray
    # start the next one early): a fold runs from its first epoch's start to its last's end.
    spans = [(rs[0]["time"] - rs[0]["seconds"], rs[-1]["time"]) for rs in rows.values()]
    for t, _ in spans:
        assert sum(a <= t < b for a, b in spans) <= 2, spans
