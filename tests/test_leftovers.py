"""What a SIGKILLed writer leaves is removed by the next run of the same command (issue 19,
item 10): temporary names carry the pid, and a pid that no longer runs is a leftover."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _runfolder import make_npz, make_run

from marsseg import predict as P
from marsseg._io import atomic_path, dead_leftovers
from marsseg.data import prepare
from marsseg.data import shards as S


@pytest.fixture(scope="module")
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_dead_leftovers_finds_only_dead_pids(tmp_path, dead_pid):
    for name in (f"x.csv.tmp-{dead_pid}", "x.csv.tmp-1", "x.csv.tmp-abc", "y.csv.tmp-7"):
        (tmp_path / name).write_text("")
    assert dead_leftovers(tmp_path, "x.csv.tmp-") == [tmp_path / f"x.csv.tmp-{dead_pid}"]


def test_predict_removes_a_killed_runs_csv_and_probs(tmp_path, dead_pid):
    """`X.csv.tmp-<pid>` and `X.h5.tmp-<pid>` stayed after a successful rerun."""
    run = make_run(tmp_path / "r", members=("a",), k=1)
    npz = make_npz(tmp_path / "d.npz", n_train=4, n_test=3)
    old_csv = tmp_path / f"s.csv.tmp-{dead_pid}"
    old_h5 = tmp_path / f"p.h5.tmp-{dead_pid}"
    old_csv.write_bytes(b"id,0\n1,")
    old_h5.write_bytes(b"\x89HDF")
    P.predict(run, npz, tmp_path / "s.csv", probs_path=tmp_path / "p.h5", backend="eager")
    assert not old_csv.exists() and not old_h5.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "p.h5", "r", "s.csv"]


def test_prepare_builds_in_a_hidden_folder_and_removes_a_killed_ones(tmp_path, dead_pid,
                                                                     monkeypatch):
    """`OUT.tmp-<pid>/` (260 MB) stayed; README says the temporary folder is hidden."""
    npz = make_npz(tmp_path / "d.npz", n_train=4, n_test=3)
    old = tmp_path / f".sh.tmp-{dead_pid}"
    older = tmp_path / f"sh.tmp-{dead_pid}"  # the visible name earlier versions used
    for d in (old, older):
        d.mkdir()
        (d / "train-000.h5").write_bytes(b"half")
    seen = []
    real = S.write_shard
    monkeypatch.setattr(S, "write_shard", lambda path, *a: seen.append(path.parent.name)
                        or real(path, *a))
    prepare(npz, tmp_path / "sh")
    assert seen and all(n.startswith(".sh.tmp-") for n in seen)
    assert not old.exists() and not older.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "sh"]


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    """pid 1 runs: its temporary name is not a leftover."""
    live = tmp_path / "s.csv.tmp-1"
    live.write_text("busy")
    with atomic_path(tmp_path / "s.csv") as tmp:
        tmp.write_text("new")
    assert live.exists() and (tmp_path / "s.csv").read_text() == "new"


def test_a_swap_interrupted_after_the_old_folder_moved_keeps_it(tmp_path, dead_pid):
    """`OUT.old-<pid>` is removed only once OUT is whole again."""
    old = tmp_path / f"out.old-{dead_pid}"
    old.mkdir()
    with atomic_path(tmp_path / "other") as tmp:
        tmp.write_text("x")
    assert old.exists()  # not a leftover of `other`
    (tmp_path / "out").mkdir()
    with atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
    assert not old.exists()
