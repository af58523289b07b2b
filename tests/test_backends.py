"""Inference backends: same CSV as eager up to the allowed drift, static-shape padding,
the per-fold conversion cache (reused, invalidated), missing packages, the auto rule."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from _runfolder import make_npz, make_run, sha256
from typer.testing import CliRunner

from marsseg import backends as B
from marsseg import ensemble as L
from marsseg import inference as PR
from marsseg import predict as P
from marsseg.cli import app
from marsseg.data import prepare
from marsseg.evaluate import evaluate
from marsseg.models.registry import load_pretrained, save_pretrained
from marsseg.submission import read_submission

runner = CliRunner()
BATCH = 4  # 11 test images: two full batches and one of 3, so the padding is exercised


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("backends")
    npz = make_npz(d / "d.npz", n_train=24, n_test=11, test_masks=True)
    prepare(npz, d / "shards", shard_size=4)
    return {"dir": d, "npz": npz, "shards": d / "shards"}


def _masks(run, data, out, **cfg) -> np.ndarray:
    P.predict(run, data, out, cfg=PR.PredictConfig(batch_size=BATCH, **cfg))
    return read_submission(out)[1]


def _differing(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


# ----------------------------------------------------------------------------- no package needed


def test_static_runner_pads_and_chunks():
    seen = []

    def fn(c):
        seen.append(c.shape[0])
        return c * 2

    r = B.StaticRunner(fn, 4, "x")
    for b in (1, 3, 4, 9):
        x = torch.rand(b, 1, 8, 8)
        torch.testing.assert_close(r(x), x * 2)
    assert set(seen) == {4}  # never another shape, so nothing recompiles


def test_bad_backend_name_is_one_line(world, tmp_path):
    with pytest.raises(B.InputError, match="backend must be one of"):
        PR.PredictConfig(backend="tensorrt")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    r = runner.invoke(app, ["predict", "--ensemble", str(run), "--data", str(world["shards"]),
                            "--out", str(tmp_path / "s.csv"), "--backend", "fast", "-q"])
    assert r.exit_code == 2 and "backend must be one of" in r.output


@pytest.mark.parametrize("backend", ["openvino", "openvino-int8"])
def test_missing_package_is_one_line_exit_2(world, tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    run = make_run(tmp_path / "r", members=("a",), k=1)
    out = tmp_path / "s.csv"
    r = runner.invoke(app, ["predict", "--ensemble", str(run), "--data", str(world["shards"]),
                            "--out", str(out), "--backend", backend, "-q"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "'openvino'" in lines[0]
    assert "pip install 'marsseg[openvino]'" in lines[0]
    assert not out.exists() and not (run / "a" / "fold_0" / "cache").exists()
    r = runner.invoke(app, ["evaluate", "--ensemble", str(run), "--data", str(world["shards"]),
                            "--backend", backend, "-q"])
    assert r.exit_code == 2 and "marsseg[openvino]" in r.output


def test_auto_rule(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert B.resolve("auto", gpu) == "eager"
    assert B.resolve("eager", cpu) == "eager"
    assert B.resolve("eager", cpu, compile_flag=True) == "compile"
    assert B.resolve("auto", cpu) == ("openvino" if B.available("openvino") else "eager")
    assert B.resolve("auto", cpu, precision="no") == "eager"  # fp32: OpenVINO fp32 is slower
    assert B.resolve("auto", gpu, precision="fp16") == "eager"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert B.resolve("auto", cpu) == "eager"


def test_openvino_refuses_a_gpu_device():
    pytest.importorskip("openvino")
    with pytest.raises(B.InputError, match="CPU only"):
        B.resolve("openvino", torch.device("cuda"))


# ----------------------------------------------------------------------------- openvino


def test_openvino_csv_matches_eager(world, tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r")
    d = world["shards"]
    fp32 = _masks(run, d, tmp_path / "fp32.csv", precision="no")
    ov32 = _masks(run, d, tmp_path / "ov32.csv", precision="no", backend="openvino")
    assert _differing(ov32, fp32) < 1e-3  # same math in f32: only summation order differs
    bf16 = _masks(run, d, tmp_path / "bf16.csv", precision="bf16")
    ov16 = _masks(run, d, tmp_path / "ov16.csv", precision="bf16", backend="openvino")
    assert _differing(ov16, fp32) < 0.005  # the 0.5% budget
    assert _differing(ov16, fp32) <= _differing(bf16, fp32) + 0.002
    caches = sorted(p.name for p in (run / "a" / "fold_0" / "cache").iterdir())
    assert [c.rsplit(".", 1)[1] for c in caches] == ["bin", "json", "xml"] * 2  # + manifests
    assert all(c.startswith("openvino-") and "-b8." in c for c in caches)  # 4 images x 2 views


def test_openvino_int8_is_quantized_and_close(world, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    fp32 = _masks(run, world["shards"], tmp_path / "fp32.csv", precision="no")
    q = _masks(run, world["shards"], tmp_path / "q.csv", precision="no", backend="openvino-int8")
    xml = next((run / "a" / "fold_0" / "cache").glob("openvino-int8-*.xml")).read_text()
    assert "FakeQuantize" in xml or "FakeConvert" in xml  # really int8, not a copy of f32
    assert _differing(q, fp32) < 0.02  # opt-in: looser than the default's 0.5% on tiny nets


def test_cache_reused_then_invalidated_by_new_weights(world, tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=2)
    ens = L.load_ensemble(run)
    cfg = PR.PredictConfig(batch_size=BATCH, precision="no", backend="openvino")
    first: list[str] = []
    PR.Predictor(ens, cfg, log=first.append)
    assert [m.split(" ...")[0] for m in first] == ["converting a/fold_0 (openvino)",
                                                  "converting a/fold_1 (openvino)"]
    assert all(m.endswith(")") and " s (cached in " in m for m in first)
    xml0 = next((run / "a" / "fold_0" / "cache").glob("*.xml"))
    mtime = xml0.stat().st_mtime_ns
    again: list[str] = []
    PR.Predictor(L.load_ensemble(run), cfg, log=again.append)
    assert again == [] and xml0.stat().st_mtime_ns == mtime  # no second conversion
    # retrain fold 0 (new weights, new sha in ensemble.json): only it converts again
    folder = run / "a" / "fold_0"
    model = load_pretrained(folder)
    with torch.no_grad():
        model.head.bias.add_(0.5)
    save_pretrained(model, folder, json.loads((folder / "config.json").read_text()))
    spec = json.loads((run / "ensemble.json").read_text())
    spec["members"][0]["folds"][0]["sha256"] = sha256(folder / "model.safetensors")
    (run / "ensemble.json").write_text(json.dumps(spec))
    third: list[str] = []
    PR.Predictor(L.load_ensemble(run), cfg, log=third.append)
    assert [m.split(" ...")[0] for m in third] == ["converting a/fold_0 (openvino)"]
    assert not xml0.exists()  # the stale conversion is pruned
    assert len(list((folder / "cache").glob("*.xml"))) == 1


def test_cli_predict_shows_conversion_then_uses_cache(world, tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=1)
    args = ["predict", "--ensemble", str(run), "--data", str(world["npz"]), "--batch-size",
            str(BATCH), "--backend", "openvino"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "1.csv")])
    assert r.exit_code == 0, r.output
    assert "converting a/fold_0 (openvino) ..." in r.output and "openvino" in r.output
    r = runner.invoke(app, args + ["--out", str(tmp_path / "2.csv")])
    assert r.exit_code == 0 and "converting" not in r.output
    assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()


def test_evaluate_with_openvino_scores_like_eager(world, tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=2)
    kw = {"batch_size": BATCH, "precision": "no"}
    ref = evaluate(run, world["npz"], cfg=PR.PredictConfig(**kw), write=False)
    got = evaluate(run, world["npz"], cfg=PR.PredictConfig(backend="openvino", **kw), write=False)
    assert got["backend"] == "openvino" and ref["backend"] == "eager"
    for a, b in zip(ref["rows"], got["rows"], strict=True):
        assert a["name"] == b["name"] and abs(a["miou"] - b["miou"]) < 1e-3


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compile_csv_matches_eager_and_is_cached(world, tmp_path):
    run = make_run(tmp_path / "r", members=("a",), k=1)
    fp32 = _masks(run, world["shards"], tmp_path / "fp32.csv", precision="no")
    log: list[str] = []
    pred = PR.Predictor(L.load_ensemble(run), PR.PredictConfig(batch_size=BATCH, precision="no",
                                                             backend="compile"), log=log.append)
    assert len(log) == 1 and log[0].startswith("converting a/fold_0 (compile) ...")
    got = _masks(run, world["shards"], tmp_path / "c.csv", precision="no", backend="compile")
    assert _differing(got, fp32) < 1e-3
    assert pred.backend == "compile"
    pt2 = list((run / "a" / "fold_0" / "cache").glob("compile-f32-*-b8-torch*.pt2"))
    assert len(pt2) == 1


@pytest.mark.slow
def test_workers_load_the_drivers_conversion(world, tmp_path):
    pytest.importorskip("openvino")
    run = make_run(tmp_path / "r", members=("a",), k=2)
    cfg = PR.PredictConfig(batch_size=BATCH, precision="no", backend="openvino")
    P.predict(run, world["shards"], tmp_path / "two.csv", cfg=cfg, workers=2)
    xml = sorted((run / "a").glob("fold_*/cache/*.xml"))
    assert len(xml) == 2  # one conversion per fold (the driver's); workers load it
    mtimes = [p.stat().st_mtime_ns for p in xml]
    P.predict(run, world["shards"], tmp_path / "one.csv", cfg=cfg)
    assert [p.stat().st_mtime_ns for p in xml] == mtimes
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
