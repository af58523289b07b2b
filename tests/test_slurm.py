"""The slurm/ job scripts, run for real: sbatch against a live slurmctld.

CI brings up a one-node cluster with `.ci/slurm-up` (root, no systemd); anywhere
without a controller the `slurm`-marked tests skip and say why. Each job is
submitted with `sbatch --wait` under a timeout and cancelled if it overruns.
The static checks at the bottom (commented #SBATCH lines, overridable paths)
run everywhere.

The jobs run the venv this test runs in (VENV is passed with --export) and, as
the scripts do by default, Ray with token authentication.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marsseg.submission import read_submission

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
TRAIN, PREDICT, ARRAY = (SLURM / f for f in ("train-folds.sbatch", "predict.sbatch",
                                             "train-fold-array.sbatch"))
VENV = Path(sys.prefix)
JOB_TIMEOUT = int(os.environ.get("MARSSEG_SLURM_TIMEOUT", "480"))  # seconds per job
N_TRAIN, N_TEST = 200, 40


@functools.cache
def _slurm_missing() -> str | None:
    """Why the cluster tests cannot run here, or None when they can."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return ("SLURM client tools (sbatch, sinfo) are not installed; as root, "
                ".ci/slurm-up installs and starts a one-node cluster")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                           timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answers (start one with .ci/slurm-up)"
    if r.returncode != 0:
        return f"no SLURM controller answers ({r.stderr.strip()}); start one with .ci/slurm-up"
    states = [s.rstrip("*~#!%$@^-") for s in r.stdout.split()]
    if not any(s in ("idle", "mix", "alloc", "comp", "plnd") for s in states):
        return f"no usable SLURM node (sinfo node states: {' '.join(states) or 'none'})"
    if not (VENV / "bin" / "marsseg-cli").exists():
        return f"{VENV}/bin/marsseg-cli not found: run the tests from the project venv"
    return None



# --- helpers ----------------------------------------------------------------------------------


def _foreign_ray() -> bool:
    """Whether Ray processes not started by these tests run on this machine."""
    for p in Path("/proc").glob("[0-9]*"):
        try:
            name = (p / "comm").read_text().strip()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if name in ("raylet", "gcs_server") and b"/tmp/ray-" not in cmd:
            return True
    return False


def _ray_procs(job_id: str) -> list[int]:
    """Pids of processes still using the Ray temp dir of job `job_id`."""
    tag = f"/tmp/ray-{job_id}/".encode()
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if tag in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


class Job:
    """One `sbatch --wait` submission; the job id is known as soon as sbatch prints it."""

    def __init__(self, script: Path, workdir: Path, export: dict, args=(), wait=True):
        self.workdir = workdir
        # `ray stop` ends every Ray process of this user on the node; skip that final
        # sweep when someone else's Ray runs here (a shared development machine).
        export = {"RAY_STOP": "0" if _foreign_ray() else "1", **export}
        exp = ",".join(["ALL"] + [f"{k}={v}" for k, v in export.items()])
        cmd = ["sbatch", "--parsable", f"--chdir={workdir}", f"--export={exp}",
               "--time=15", *args, *(["--wait"] if wait else []), str(script)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.wait(timeout=30)
            pytest.fail(f"sbatch refused {script.name}: {self.proc.stderr.read()}")
        self.id = line.split(";")[0]

    def finish(self, timeout: float = JOB_TIMEOUT) -> int:
        """Exit code of the job (sbatch --wait's); cancels the job when it overruns."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", self.id], check=False)
            self.proc.wait(timeout=60)
            pytest.fail(f"job {self.id} ran over {timeout} s and was cancelled\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(self.workdir.glob(f"*-{self.id}*.out")):
            out.append(f"==== {f.name}\n{f.read_text(errors='replace')[-6000:]}")
        return "\n".join(out) or f"(no log for job {self.id} in {self.workdir})"


def _wait_gone(job_id: str, timeout: float = 120) -> None:
    """Wait until the job has left the queue and its Ray processes are gone."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        q = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
        if not q.stdout.strip() and not _ray_procs(job_id):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: still queued or Ray processes left: {_ray_procs(job_id)}")


def _assert_clean_shutdown(job: Job) -> None:
    """The trap ended the job's Ray nodes (no process keeps its temp dir)."""
    end = time.monotonic() + 20
    while _ray_procs(job.id) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _ray_procs(job.id), f"Ray processes of job {job.id} outlived it\n{job.logs()}"


def _check_run(run: Path, k: int, member: str = "unet-se") -> dict:
    for name in ("splits.json", "recipe.toml", "ensemble.json"):
        assert (run / name).is_file(), f"{run / name} missing"
    for fold in range(k):
        d = run / member / f"fold_{fold}"
        for name in ("done.json", "model.safetensors", "config.json", "oof.h5", "metrics.jsonl"):
            assert (d / name).is_file(), f"{d / name} missing"
    ens = json.loads((run / "ensemble.json").read_text())
    assert ens["k"] == k
    (m,) = [m for m in ens["members"] if m["name"] == member]
    assert sorted(f["fold"] for f in m["folds"]) == list(range(k))
    assert ens["selected"] == [member]
    assert ens["oof_miou_ensemble"] is not None
    return ens


def _lines(fold_dir: Path) -> list[str]:
    return [ln for ln in (fold_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _epoch(line: str) -> int:
    """The epoch of a metrics line; -1 for a line cut short by the kill."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return -1


def _metrics(fold_dir: Path) -> list[dict]:
    """metrics.jsonl of a fold: one dict per finished epoch."""
    return [json.loads(line) for line in _lines(fold_dir)]


def _saved_epoch(fold_dir: Path) -> int | None:
    """Last epoch in the fold's saved training state, or None when nothing was saved."""
    for name in ("state", "state.old"):
        p = fold_dir / name / "trainer.json"
        if p.is_file():
            try:
                return json.loads(p.read_text())["epoch"]
            except (OSError, ValueError, KeyError):
                continue
    return None


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Demo shards, a work folder for logs, and the variables every job gets."""
    # Asked here, not at import: `-m "not slurm"` never waits for a dead controller.
    if (why := _slurm_missing()) is not None:
        pytest.skip(f"SLURM: {why}")
    root = tmp_path_factory.mktemp("slurm")
    cli = str(VENV / "bin" / "marsseg-cli")
    subprocess.run([cli, "synth", "--out", str(root / "synth.npz"), "--n-train", str(N_TRAIN),
                    "--n-test", str(N_TEST), "--seed", "0"], check=True, capture_output=True)
    subprocess.run([cli, "prepare", "--data", str(root / "synth.npz"), "--out", str(root / "shards")], check=True,
                   capture_output=True)
    export = {"VENV": VENV, "DATA": root / "shards", "RAY_AUTH_MODE": "token"}
    return root, export


def _k(recipe: Path) -> int:
    return int(re.search(r"^folds\s*=\s*(\d+)", recipe.read_text(), re.M).group(1))


# --- the jobs -----------------------------------------------------------------------------------


@pytest.mark.slurm
def test_train_folds_job_then_dependent_predict_job(cluster):
    root, export = cluster
    run, csv = root / "runs" / "demo", root / "out" / "submission.csv"
    train = Job(TRAIN, root, {**export, "RUN": run})
    predict = Job(PREDICT, root, {**export, "RUN": run, "OUT": csv},
                  args=[f"--dependency=afterok:{train.id}", "--kill-on-invalid-dep=yes"])
    assert train.finish() == 0, train.logs()
    assert predict.finish() == 0, f"{predict.logs()}\n{train.logs()}"

    _check_run(run, _k(REPO / "ensembles" / "demo.toml"))
    ids, masks = read_submission(csv)
    assert len(ids) == N_TEST and list(ids) == sorted(ids)
    assert masks.min() >= 1 and masks.max() <= 4  # foreground argmax, the submission default

    log = train.logs()
    assert "auth token" in log and "1 node(s) up" in log, log
    assert f"-> {run}" in log and "stopping Ray (exit code 0)" in log, log
    assert "2 workers" in predict.logs(), predict.logs()
    _assert_clean_shutdown(train)
    _assert_clean_shutdown(predict)


@pytest.mark.slurm
def test_fold_array_trains_every_fold_into_one_run(cluster):
    root, export = cluster
    run = root / "runs" / "array"
    k = _k(REPO / "ensembles" / "demo.toml")
    job = Job(ARRAY, root, {**export, "RUN": run}, args=[f"--array=0-{k - 1}"])
    assert job.finish() == 0, job.logs()
    _check_run(run, k)
    for fold in range(k):
        log = root / f"marsseg-fold-{job.id}_{fold}.out"
        assert log.is_file(), job.logs()
        assert f"fold {fold} done" in log.read_text(), log.read_text()

    # Submitting the array again trains nothing: every fold is already finished.
    done = {p: p.stat().st_mtime_ns for p in run.glob("*/fold_*/done.json")}
    again = Job(ARRAY, root, {**export, "RUN": run}, args=[f"--array=0-{k - 1}"])
    assert again.finish() == 0, again.logs()
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/fold_*/done.json")} == done
    assert again.logs().count("already finished") == k, again.logs()
    _check_run(run, k)


@pytest.mark.slurm
def test_job_with_a_missing_path_fails_at_once_naming_it(cluster):
    root, export = cluster
    job = Job(TRAIN, root, {**export, "DATA": root / "no-such-shards", "RUN": root / "runs" / "x"})
    assert job.finish(timeout=120) == 2, job.logs()
    assert f"{root / 'no-such-shards'} does not exist" in job.logs(), job.logs()
    assert not (root / "runs" / "x").exists()


@pytest.mark.slurm
def test_cancelled_job_resumes_when_submitted_again(cluster):
    """scancel mid-training, submit again: unfinished folds continue after their last
    saved epoch (earlier epochs are kept, not retrained); finished folds are skipped."""
    root, export = cluster
    text = (REPO / "ensembles" / "demo.toml").read_text()
    text, n = re.subn(r"^epochs\s*=\s*\d+", "epochs = 6", text, flags=re.M)
    assert n == 1, "ensembles/demo.toml: expected one `epochs =` line"
    recipe = root / "resume.toml"
    recipe.write_text(text)
    k = _k(recipe)
    run = root / "runs" / "resume"
    env = {**export, "RECIPE": recipe, "RUN": run}
    folds = [run / "unet-se" / f"fold_{f}" for f in range(k)]

    first = Job(TRAIN, root, env)
    end = time.monotonic() + JOB_TIMEOUT
    while not any(_saved_epoch(d) is not None for d in folds):
        assert first.proc.poll() is None, f"job ended before any epoch was saved\n{first.logs()}"
        assert time.monotonic() < end, f"no epoch saved in {JOB_TIMEOUT} s\n{first.logs()}"
        time.sleep(0.5)
    subprocess.run(["scancel", first.id], check=True)
    first.finish()  # sbatch --wait's exit code for a cancelled job varies by version
    _wait_gone(first.id)
    shutil.rmtree(f"/tmp/ray-{first.id}", ignore_errors=True)  # kept by a failed job for its logs

    saved = {d: _saved_epoch(d) for d in folds}
    done_before = {d for d in folds if (d / "done.json").is_file()}
    assert any(saved[d] is not None and d not in done_before for d in folds), \
        f"no fold was cancelled after a saved epoch\n{first.logs()}"
    assert "received TERM" in first.logs() and "stopping Ray" in first.logs(), first.logs()
    # The saved epochs' metric lines, exactly as the cancelled job wrote them.
    kept_lines = {d: [ln for ln in _lines(d) if -1 < _epoch(ln) <= saved[d]]
                  for d in folds if saved[d] is not None}
    done_mtime = {d: (d / "done.json").stat().st_mtime_ns for d in done_before}

    again = Job(TRAIN, root, env)
    assert again.finish() == 0, again.logs()
    _check_run(run, k)
    for d in folds:
        rows = _metrics(d)
        assert [r["epoch"] for r in rows] == list(range(6)), rows
        if d in done_before:
            assert (d / "done.json").stat().st_mtime_ns == done_mtime[d], f"{d} retrained"
        elif saved[d] is not None:
            e = saved[d]
            assert _lines(d)[: e + 1] == kept_lines[d], f"{d}: saved epochs 0..{e} retrained"
            assert rows[e + 1].get("resumed") is True, f"{d}: did not resume after epoch {e}"
    _assert_clean_shutdown(again)


@pytest.mark.slurm
def test_impossible_request_is_refused_at_submission(cluster):
    """EnforcePartLimits=ALL and a one-node cluster: asking for more nodes than exist
    fails at sbatch time instead of pending forever."""
    root, export = cluster
    n = len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True,
                           text=True).stdout.split())
    r = subprocess.run(["sbatch", f"--nodes={n + 1}", f"--chdir={root}", str(TRAIN)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "error" in r.stderr.lower(), (r.stdout, r.stderr)


# --- static checks of the scripts (run everywhere) --------------------------------------------

SCRIPTS = [TRAIN, PREDICT, ARRAY]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_sbatch_line_is_commented(script):
    lines = [ln for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert lines, f"{script.name}: no #SBATCH lines"
    for ln in lines:
        assert re.match(r"#SBATCH\s+--\S+\s+#\s*\S", ln), f"{script.name}: no comment on: {ln}"
    opts = " ".join(lines)
    for opt in ("--nodes", "--cpus-per-task", "--gpus-per-node", "--time", "--output"):
        assert opt in opts, f"{script.name}: no {opt} line"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_paths_are_overridable_and_none_is_a_developers(script):
    text = script.read_text()
    for var in ("VENV", "DATA", "RECIPE", "RUN"):
        assert re.search(rf"^{var}=\$\{{{var}:-", text, re.M), f"{script.name}: {var} not overridable"
    body = text + (SLURM / "_ray-cluster.sh").read_text()
    for bad in (str(REPO), "/work/", "/home/", "/Users/"):
        assert bad not in body, f"{script.name}: hard-coded path {bad}"


@pytest.mark.parametrize("script", [*SCRIPTS, SLURM / "_ray-cluster.sh", REPO / ".ci" / "slurm-up",
                                    REPO / ".ci" / "slurm-down"], ids=lambda p: p.name)
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
