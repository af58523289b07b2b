"""predict: flip TTA math, ensemble loading, streaming CSV, workers, bad inputs."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
from _runfolder import make_npz, make_run
from typer.testing import CliRunner

from marsseg import ensemble as L
from marsseg import inference as PR
from marsseg import predict as P
from marsseg.cli import app
from marsseg.data import prepare
from marsseg.errors import InputError
from marsseg.submission import read_submission

runner = CliRunner()
FP32 = dict(precision="no", batch_size=4)


def symmetrize(model: torch.nn.Module) -> None:
    """Make every conv kernel left-right symmetric: the whole U-Net becomes flip-equivariant
    (2x2 pooling, nearest upsampling, BN and ReLU already are for even widths)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    npz = make_npz(d / "d.npz", n_train=6, n_test=11)
    prepare(npz, d / "shards", shard_size=4)
    prepare(npz, d / "shards7", shard_size=7)
    run = make_run(d / "run")
    return {"dir": d, "npz": npz, "shards": d / "shards", "run": run}


# ----------------------------------------------------------------------------- TTA math


def test_tta_equals_hand_computed_average():
    torch.manual_seed(0)
    from marsseg.models.registry import build_model
    m = build_model("unet", base_width=4, depth=2).eval()
    x = torch.rand(3, 1, 64, 128) * 255
    with torch.no_grad():
        p1 = torch.softmax(m(x), 1)
        p2 = torch.softmax(m(x.flip(-1)), 1).flip(-1)
        got = PR.mean_views(PR.forward_views(m, x, PR.VIEWS_HFLIP))
        assert not torch.allclose(p1, p2, atol=1e-3)  # the views really differ
        torch.testing.assert_close(got, (p1 + p2) / 2, atol=1e-5, rtol=1e-5)
        views = [torch.softmax(m(x.flip(d) if d else x), 1) for d in PR.VIEWS_HVFLIP]
        views = [v.flip(d) if d else v for v, d in zip(views, PR.VIEWS_HVFLIP, strict=True)]
        four = PR.mean_views(PR.forward_views(m, x, PR.tta_views(True, vflip=True)))
        torch.testing.assert_close(four, sum(views) / 4, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(PR.mean_views(PR.forward_views(m, x, PR.tta_views(False))), p1)


def test_views_go_through_one_forward_pass():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return torch.zeros(x.shape[0], 5, *x.shape[2:])

    PR.forward_views(Spy(), torch.zeros(3, 1, 64, 128), PR.VIEWS_HFLIP)
    assert calls == [6]


def test_flip_symmetric_model_same_with_and_without_tta(world, tmp_path):
    run = make_run(tmp_path / "sym", members=("s",), k=1, transform=symmetrize)
    ens = L.load_ensemble(run)
    x = np.load(world["npz"])["test_set"][:4]
    res = {}
    for tta in (False, True):
        pred = PR.Predictor(ens, PR.PredictConfig(tta=tta, **FP32))
        res[tta] = pred(np.arange(4), x, want_probs=True)
    np.testing.assert_allclose(res[True].probs.astype(np.float32),
                               res[False].probs.astype(np.float32), atol=2e-3)
    # the network itself is equivariant: flipping the input flips the output
    with torch.no_grad():
        xt = torch.from_numpy(x).float()[:, None]
        m = ens.models[0].model
        torch.testing.assert_close(m(xt.flip(-1)), m(xt).flip(-1), atol=1e-4, rtol=1e-4)
    ((_, (p,)),) = PR.Predictor(ens, PR.PredictConfig(tta=False, **FP32)).member_views(x)
    top2 = p.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-4).numpy()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(res[True].labels[clear], res[False].labels[clear])


def test_foreground_never_predicts_background():
    probs = torch.zeros(1, 5, 2, 2)
    probs[:, 0] = 0.9
    probs[:, 3] = 0.1
    assert (PR.to_labels(probs, "foreground") == 3).all()
    assert (PR.to_labels(probs, "all") == 0).all()


# ----------------------------------------------------------------------------- ensemble


def test_load_ensemble_weights_and_filters(tmp_path):
    run = make_run(tmp_path / "r", members=("a", "b", "c"), k=2, weights={"a": 2.0, "b": 1.0},
                   selected=["a", "b"])
    ens = L.load_ensemble(run)
    assert ens.names == ["a/fold_0", "a/fold_1", "b/fold_0", "b/fold_1"]
    assert [round(m.weight, 4) for m in ens.models] == [1 / 3, 1 / 3, 1 / 6, 1 / 6] or \
        np.allclose([m.weight for m in ens.models], [1 / 3, 1 / 3, 1 / 6, 1 / 6])
    ens = L.load_ensemble(run, members=["c"], folds=[1])
    assert ens.names == ["c/fold_1"] and ens.models[0].weight == 1.0
    one = L.load_ensemble(run / "b" / "fold_0")  # a single fold folder works alone
    assert one.names == ["b/fold_0"]
    with pytest.raises(InputError, match="unknown member"):
        L.load_ensemble(run, members=["zz"])
    with pytest.raises(InputError, match="fold"):
        L.load_ensemble(run, folds=[5])


def test_ensemble_average_is_weighted_member_softmax(world, tmp_path):
    run = make_run(tmp_path / "r", members=("a", "b"), k=1, weights={"a": 3.0, "b": 1.0})
    ens = L.load_ensemble(run)
    x = np.load(world["npz"])["test_set"][:2]
    pred = PR.Predictor(ens, PR.PredictConfig(tta=True, **FP32))
    each = [PR.mean_views(ps) for _, ps in pred.member_views(x)]
    got = pred(np.arange(2), x, want_probs=True, want_disagreement=True)
    want = 0.75 * each[0] + 0.25 * each[1]
    np.testing.assert_allclose(got.probs.astype(np.float32), want.numpy(), atol=1e-3)
    la, lb = (PR.to_labels(p).numpy() for p in each)
    lab = got.labels
    want_dis = 0.75 * (la != lab) + 0.25 * (lb != lab)
    np.testing.assert_allclose(got.disagreement.astype(np.float32), want_dis, atol=1e-3)


# ----------------------------------------------------------------------------- CSV end to end


def test_predict_csv_matches_predictor_and_layouts_agree(world, tmp_path):
    cfg = PR.PredictConfig(**FP32)
    outs = {}
    for name, data in (("shards4", world["shards"]), ("shards7", world["dir"] / "shards7"),
                       ("npz", world["npz"])):
        outs[name] = tmp_path / f"{name}.csv"
        r = P.predict(world["run"], data, outs[name], cfg=cfg)
        assert r.rows == 11
    ref = outs["shards4"].read_bytes()
    assert outs["shards7"].read_bytes() == ref
    assert outs["npz"].read_bytes() == ref
    ids, masks = read_submission(outs["npz"])
    np.testing.assert_array_equal(ids, np.arange(11))
    x = np.load(world["npz"])["test_set"]
    direct = PR.Predictor(L.load_ensemble(world["run"]), cfg)(ids[:4], x[:4])
    np.testing.assert_array_equal(masks[:4], direct.labels)
    assert masks.min() >= 1  # foreground by default


def test_probs_file(world, tmp_path):
    out = tmp_path / "s.csv"
    P.predict(world["run"], world["shards"], out, cfg=PR.PredictConfig(**FP32, classes="all"),
              probs_path=tmp_path / "p.h5")
    _, masks = read_submission(out)
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["probs"].dtype == np.float16 and f["probs"].shape == (11, 5, 64, 128)
        probs = f["probs"][()].astype(np.float32)
        dis = f["disagreement"][()].astype(np.float32)
        np.testing.assert_array_equal(f["ids"][()], np.arange(11))
    np.testing.assert_allclose(probs.sum(1), 1, atol=5e-3)
    assert dis.min() >= 0 and dis.max() <= 1 and dis.max() > 0
    top2 = np.sort(probs, axis=1)[:, -2:]
    clear = (dis == 0) & (top2[:, 1] - top2[:, 0] > 2e-3)  # f16 rounding may flip near-ties
    np.testing.assert_array_equal(probs.argmax(1)[clear], masks[clear])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5", "s.csv"]


@pytest.mark.slow
def test_workers_give_byte_identical_csv(world, tmp_path):
    cfg = PR.PredictConfig(**FP32)
    P.predict(world["run"], world["shards"], tmp_path / "one.csv", cfg=cfg)
    P.predict(world["run"], world["shards"], tmp_path / "two.csv", cfg=cfg, workers=2)
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()


def test_cli_predict_ray_start_failure_is_one_line_exit_1(world, tmp_path, ray_start_fails):
    out = tmp_path / "s.csv"
    r = runner.invoke(app, ["predict", "--ensemble", str(world["run"]), "--data",
                            str(world["shards"]), "--out", str(out), "--workers", "2", "-q"])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Ray could not start a local node" in lines[0], r.stderr
    assert lines[0].endswith("or give --workers 1 to predict in this process"), lines[0]
    assert "Traceback" not in r.output and ray_start_fails == ["local"]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_cli_predict(world, tmp_path):
    out = tmp_path / "s.csv"
    r = runner.invoke(app, ["predict", "--ensemble", str(world["run"]), "--data",
                            str(world["shards"]), "--out", str(out), "--no-tta", "--members",
                            "a", "--folds", "0,1", "--precision", "no", "-q"])
    assert r.exit_code == 0, r.output
    assert "wrote 11 rows" in r.output
    assert read_submission(out)[0].tolist() == list(range(11))


# ----------------------------------------------------------------------------- bad inputs


def _cli(world, out, run=None, data=None, *extra):
    return runner.invoke(app, ["predict", "--ensemble", str(run or world["run"]), "--data",
                               str(data or world["shards"]), "--out", str(out), "-q", *extra])


def _assert_clean_failure(r, out, code=2):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name)]


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_file(world, tmp_path):
    run = _copy_run(world["run"], tmp_path / "run")
    os.remove(run / "b" / "fold_1" / "model.safetensors")
    r = _cli(world, tmp_path / "s.csv", run)
    _assert_clean_failure(r, tmp_path / "s.csv")
    assert "model.safetensors" in r.output


@pytest.mark.parametrize("verify", [True, False])
def test_corrupted_weight_file(world, tmp_path, verify):
    run = _copy_run(world["run"], tmp_path / "run")
    w = run / "a" / "fold_0" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    if verify:
        r = _cli(world, tmp_path / "s.csv", run)
        _assert_clean_failure(r, tmp_path / "s.csv")
        assert "model.safetensors" in r.output
    else:  # without the sha256 check, the loader itself must refuse the file
        with pytest.raises(InputError, match="model.safetensors"):
            L.load_ensemble(run, verify=False)


def test_shards_of_another_image_size(world, tmp_path):
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(world["shards"], shards)
    with h5py.File(shards / "test-000.h5", "a") as f:
        n = f["images"].shape[0]
        del f["images"]
        f["images"] = np.zeros((n, 32, 64), np.uint8)
    r = _cli(world, tmp_path / "s.csv", data=shards)
    _assert_clean_failure(r, tmp_path / "s.csv")
    assert "shape" in r.output


def test_truncated_hdf5_shard(world, tmp_path):
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(world["shards"], shards)
    p = shards / "test-001.h5"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    r = _cli(world, tmp_path / "s.csv", data=shards)
    _assert_clean_failure(r, tmp_path / "s.csv")
    assert "test-001.h5" in r.output


def test_output_in_missing_directory(world, tmp_path):
    out = tmp_path / "nope" / "s.csv"
    r = _cli(world, out)
    assert r.exit_code == 2 and "does not exist" in r.output
    assert not (tmp_path / "nope").exists()


def test_ctrl_c_leaves_no_csv(world, tmp_path, monkeypatch):
    real = PR.Predictor.__call__
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(PR.Predictor, "__call__", interrupted)
    out = tmp_path / "s.csv"
    r = _cli(world, out, None, None, "--probs", str(tmp_path / "p.h5"), "--batch-size", "4")
    assert r.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_keyword_options_and_probs_file(world, tmp_path):
    import h5py

    r = P.predict(world["run"], world["npz"], tmp_path / "s.csv", tta=False, precision="no",
                  batch_size=4, probs_path=tmp_path / "p.h5")
    assert r.views == 1 and r.precision == "no"
    with h5py.File(tmp_path / "p.h5") as f:
        probs, dis = f["probs"][()], f["disagreement"][()]
    assert probs.shape == (11, 5, 64, 128) and dis.shape == (11, 64, 128)
    _, masks = read_submission(tmp_path / "s.csv")
    p = torch.from_numpy(probs.astype(np.float32))
    top2 = p[:, 1:].topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 2e-3).numpy()  # f16 rounding may flip near-ties
    np.testing.assert_array_equal(PR.to_labels(p).numpy()[clear], masks[clear])
    with pytest.raises(TypeError, match="unknown predict option"):
        P.predict(world["run"], world["npz"], tmp_path / "t.csv", speed=3)
