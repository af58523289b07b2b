"""The conversion cache is verified before it is loaded (issue 19): a tampered, mixed-up or
half-deleted cache is converted again with one line, a compiled library is never loaded
unverified, the prune removes only names the cache writes and never follows a link, and a
failed conversion leaves nothing behind."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import torch
from _runfolder import make_npz, make_run
from typer.testing import CliRunner

from marsseg import backends as B
from marsseg import cache as C
from marsseg import ensemble as L
from marsseg import inference as PR
from marsseg import predict as P
from marsseg.cli import app
from marsseg.errors import InputError

runner = CliRunner()
BATCH = 4


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("cache") / "d.npz", n_train=8, n_test=5)


def _ov_cfg():
    return PR.PredictConfig(batch_size=BATCH, precision="no", backend="openvino")


def _convert(run) -> list[str]:
    log: list[str] = []
    PR.Predictor(L.load_ensemble(run), _ov_cfg(), log=log.append)
    return log


def _files(run, fold=0, ext="*"):
    return sorted((run / "a" / f"fold_{fold}" / "cache").glob(f"openvino-*.{ext}"))


def test_manifest_records_every_file_and_the_weights(tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    _convert(run)
    (manifest,) = _files(run, ext="json")
    m = json.loads(manifest.read_text())
    spec = json.loads((run / "ensemble.json").read_text())
    assert m["weights_sha256"] == spec["members"][0]["folds"][0]["sha256"]
    assert m["backend"] == "openvino" and m["batch"] == 2 * BATCH and "openvino" in m["versions"]
    assert sorted(m["files"]) == sorted(p.name for p in _files(run) if p.suffix != ".json")


def test_tampered_bin_is_converted_again_with_one_line(tmp_path, npz):
    """The issue's repro: the final bias patched in the .bin (same size) gave 100% class 3."""
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    P.predict(run, npz, tmp_path / "ref.csv", cfg=_ov_cfg())
    (binf,) = _files(run, ext="bin")
    data = bytearray(binf.read_bytes())
    data[-8:] = np.full(2, 1e4, np.float32).tobytes()  # same size, other numbers
    binf.write_bytes(bytes(data))
    P.predict(run, npz, tmp_path / "again.csv", cfg=_ov_cfg())
    log = _convert(run)  # verified now: nothing to convert
    assert log == []
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


def test_mismatch_is_one_progress_line_naming_the_reason(tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    _convert(run)
    (binf,) = _files(run, ext="bin")
    binf.write_bytes(binf.read_bytes()[:-4] + b"\0\0\0\0")
    log = _convert(run)
    assert len(log) == 1 and log[0].startswith("converting a/fold_0 (openvino) ...")
    assert "did not verify" in log[0] and binf.name in log[0], log


def test_other_folds_pair_under_this_key_is_not_used(tmp_path, npz):
    """fold_1's files (manifest included) copied under fold_0's key answered for fold 0."""
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=2)
    P.predict(run, npz, tmp_path / "ref.csv", cfg=_ov_cfg())
    for src, dst in zip(_files(run, 1), _files(run, 0), strict=True):
        shutil.copyfile(src, dst)
    log = _convert(run)
    assert [m.split(" ...")[0] for m in log] == ["converting a/fold_0 (openvino)"]
    assert "other weights" in log[0]
    P.predict(run, npz, tmp_path / "again.csv", cfg=_ov_cfg())
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


@pytest.mark.parametrize("delete", ["bin", "json", "xml"])
def test_half_deleted_cache_heals(tmp_path, delete):
    """A .xml without its .bin (or without its manifest) never healed before."""
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    _convert(run)
    (_files(run, ext=delete)[0]).unlink()
    assert len(_convert(run)) == 1
    assert [p.suffix for p in _files(run)] == [".bin", ".json", ".xml"]
    assert _convert(run) == []


def test_corrupted_cache_in_evaluate_and_report_is_not_a_traceback(tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    data = make_npz(tmp_path / "l.npz", n_train=8, n_test=4, test_masks=True)
    _convert(run)
    for p in _files(run):
        if p.suffix != ".json":
            p.write_bytes(b"<garbage")
    base = ["--ensemble", str(run), "--data", str(data), "--batch-size", str(BATCH),
            "--backend", "openvino", "--precision", "no"]
    r = runner.invoke(app, ["evaluate", *base])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "did not verify" in r.stderr
    (_files(run, ext="xml")[0]).write_bytes(b"")
    r = runner.invoke(app, ["report", *base, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_prune_removes_only_cache_names_and_never_through_a_link(tmp_path):
    """The issue's repro: `cache` a link to a folder holding
    openvino-bf16-0123456789abcdef-b1-notes.txt; a conversion deleted that file."""
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keep = ["openvino-bf16-0123456789abcdef-b1-notes.txt", "openvino-f32-0123456789abcdef-b8.xml"]
    for name in keep:
        (elsewhere / name).write_text("mine")
    (run / "a" / "fold_0" / "cache").symlink_to(elsewhere, target_is_directory=True)
    assert len(_convert(run)) == 1  # converted into a temporary folder instead
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(keep)
    # in a real cache folder: stale conversions go, look-alike names stay
    (run / "a" / "fold_0" / "cache").unlink()
    _convert(run)
    cache = run / "a" / "fold_0" / "cache"
    (cache / keep[0]).write_text("mine")
    (cache / "openvino-f32-0123456789abcdef-b8.xml").write_text("stale")
    C.prune(cache, "openvino", "f" * 64)
    assert (cache / keep[0]).exists()
    assert not (cache / "openvino-f32-0123456789abcdef-b8.xml").exists()


def test_dead_writers_temporary_cache_files_are_pruned(tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / f"openvino-f32-0123456789abcdef-b8.tmp-{p.pid}.bin"
    live = cache / f"openvino-f32-0123456789abcdef-b8.tmp-{1}.bin"  # init: alive
    for f in (dead, live):
        f.write_text("x")
    C.prune(cache, "openvino", "0123456789abcdef" + "0" * 48)
    assert not dead.exists() and live.exists()


def test_compiled_library_is_never_loaded_unverified(tmp_path, monkeypatch):
    """The issue's repro: a .so with a constructor swapped into the .pt2 ran at load.
    Here the 'compiler' and the loader are stand-ins that record what they get."""
    import torch._inductor  # noqa: F401 - the attribute patched below

    run = make_run(tmp_path / "r", members=("a",), k=1)
    loaded: list[bytes] = []

    def fake_compile(model, example, precision, out):
        out.write_bytes(b"PT2 package of the real weights")

    monkeypatch.setattr(B, "_compile_fold", fake_compile)
    monkeypatch.setattr(B.torch._inductor, "aoti_load_package",
                        lambda p: loaded.append(open(p, "rb").read()) or (lambda x: x))
    cfg = PR.PredictConfig(batch_size=BATCH, precision="no", backend="compile")
    PR.Predictor(L.load_ensemble(run), cfg)
    (pt2,) = (run / "a" / "fold_0" / "cache").glob("compile-*.pt2")
    pt2.write_bytes(b"PT2 package with a hostile library in it")
    log: list[str] = []
    PR.Predictor(L.load_ensemble(run), cfg, log=log.append)
    assert loaded == [b"PT2 package of the real weights"] * 2  # never the hostile bytes
    assert len(log) == 1 and "did not verify" in log[0]


def test_failed_conversion_leaves_no_cache_folder(tmp_path, monkeypatch):
    """A full disk during a conversion: one line naming the cache, no empty cache/, no
    lone .bin."""
    pytest.importorskip("openvino")
    import openvino as ov

    run = make_run(tmp_path / "r", members=("a",), k=1)

    def full_disk(model, path, **kw):
        with open(str(path)[:-4] + ".bin", "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ov, "save_model", full_disk)
    with pytest.raises(InputError, match="no space left on device"):
        _convert(run)
    assert not (run / "a" / "fold_0" / "cache").exists()


def test_versions_key_the_manifest(tmp_path, monkeypatch):
    """A conversion made by other package versions is converted again."""
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    _convert(run)
    monkeypatch.setattr(C, "versions", lambda b: {"torch": torch.__version__, "openvino": "0"})
    log = _convert(run)
    assert len(log) == 1 and "versions" in log[0]
