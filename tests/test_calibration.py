"""Temperature scaling and calibration error on synthetic logits with known answers."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from _runfolder import make_oof_run
from typer.testing import CliRunner

from marsseg.cli import app
from marsseg.errors import InputError
from marsseg.metrics import PROB_FLOOR, CalibrationMeter, labeled_argmax
from marsseg.temperature import (
    T_MAX,
    Calibration,
    apply_temperature,
    fit_temperatures,
)

runner = CliRunner()


def _sample(z: torch.Tensor, t0: float, seed: int) -> torch.Tensor:
    """Labels 1..4 drawn pixel by pixel from softmax(z[:, 1:] / t0). z (B, 5, H, W)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(z[:, 1:] / t0, 1).movedim(1, -1).reshape(-1, 4)
    y = torch.multinomial(p, 1, generator=g)[:, 0] + 1
    return y.reshape(z.shape[0], *z.shape[2:]).to(torch.uint8)


def _synthetic(t0: float, n: int = 48, seed: int = 0, scale: float = 2.5):
    """Probabilities softmax(z) stored as float16 (as oof.h5 holds them) and labels drawn from
    softmax(z / t0): the temperature that calibrates them is t0. Some truth-0 pixels too."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, 32, 64, generator=g) * scale
    truth = _sample(z, t0, seed)
    truth[:, :4] = 0  # unlabeled rows: must not count
    probs = torch.softmax(z, 1).half()
    return probs, truth


def _passes(chunks):
    return lambda: iter(chunks)


@pytest.mark.parametrize("t0", [0.6, 1.0, 1.7])
def test_fit_recovers_a_known_temperature(t0):
    probs, truth = _synthetic(t0)
    fit = fit_temperatures(_passes([({"m": probs}, truth)]))["m"]
    assert fit.temperature == pytest.approx(t0, rel=0.03)
    assert fit.pixels == int((truth > 0).sum())
    assert fit.nll_after <= fit.nll_before + 1e-9
    assert not fit.at_bound
    assert fit.passes < 15


def test_fit_is_the_exact_minimum_and_chunking_does_not_change_it():
    probs, truth = _synthetic(1.4, seed=3)
    whole = fit_temperatures(_passes([({"m": probs}, truth)]))["m"]
    chunks = [({"m": probs[s:s + 7], "n": probs[s:s + 7]}, truth[s:s + 7])
              for s in range(0, len(probs), 7)]
    both = fit_temperatures(_passes(chunks))
    assert both["m"].temperature == pytest.approx(whole.temperature, rel=1e-5)
    assert both["n"].temperature == pytest.approx(whole.temperature, rel=1e-5)
    # the NLL of the fit is lower than at T +- 1% (a minimum, not just a stationary guess)
    meter = {}
    for t in (whole.temperature * 0.99, whole.temperature, whole.temperature * 1.01):
        m = CalibrationMeter()
        m.update(apply_temperature(probs.float(), t, PROB_FLOOR), truth)
        meter[t] = m.nll()
    assert meter[whole.temperature] == pytest.approx(whole.nll_after, rel=1e-5)
    assert meter[whole.temperature] < min(v for t, v in meter.items() if t != whole.temperature)


def test_fit_stops_at_the_bound_when_the_labels_carry_no_information():
    probs, _ = _synthetic(1.0, n=8)
    truth = torch.randint(1, 5, (8, 32, 64), generator=torch.Generator().manual_seed(5))
    fit = fit_temperatures(_passes([({"m": probs}, truth)]))["m"]
    assert fit.at_bound and fit.temperature == pytest.approx(T_MAX)


def test_no_labeled_pixel_is_an_input_error():
    probs, truth = _synthetic(1.0, n=2)
    with pytest.raises(InputError, match="no labeled pixel"):
        fit_temperatures(_passes([({"m": probs}, torch.zeros_like(truth))]))


def test_ece_of_calibrated_data_is_near_zero_and_of_overconfident_data_is_not():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 5, 32, 64, generator=g) * 2
    truth = _sample(z, 1.0, 1)
    calibrated, sharp = CalibrationMeter(), CalibrationMeter()
    calibrated.update(torch.softmax(z, 1), truth)
    probs = torch.softmax(3 * z, 1)
    kept = probs.clone()
    sharp.update(probs, truth)
    assert calibrated.ece() < 0.005
    assert sharp.ece() > 0.1
    assert calibrated.nll() < sharp.nll()
    # temperature scaling repairs the over-confident one
    fit = fit_temperatures(_passes([({"m": probs, "same": probs}, truth)]))["m"]
    assert torch.equal(probs, kept)  # the inputs are left as they were
    assert fit.temperature == pytest.approx(3.0, rel=0.03)
    fixed = CalibrationMeter()
    fixed.update(apply_temperature(torch.softmax(3 * z, 1), fit.temperature), truth)
    assert fixed.ece() < 0.005


def test_meter_by_hand():
    # four labeled pixels and one unlabeled; class 0's probability is renormalised away
    p = torch.zeros(1, 5, 1, 5)
    p[0, :, 0, 0] = torch.tensor([0.5, 0.45, 0.05, 0.0, 0.0])  # p' = .9 class 1, truth 1: right
    p[0, :, 0, 1] = torch.tensor([0.0, 0.9, 0.1, 0.0, 0.0])    # .9 class 1, truth 2: wrong
    p[0, :, 0, 2] = torch.tensor([0.0, 0.3, 0.3, 0.2, 0.2])    # .3 tie -> class 1, truth 1
    p[0, :, 0, 3] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])    # 1.0 class 4, truth 4: right
    p[0, :, 0, 4] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])    # truth 0: ignored
    truth = torch.tensor([[[1, 2, 1, 4, 0]]])
    m = CalibrationMeter()
    m.update(p, truth)
    assert m.pixels == 4
    assert m.nll() == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.3) + 0) / 4,
                                    rel=1e-4)
    # bins (of 15): 0.3 -> bin 4; 0.9 -> bin 13 (two pixels, one right); 1.0 -> bin 14
    # ECE = (1*|1-.3| + 2*|.5-.9| + 1*|1-1|) / 4
    assert m.ece() == pytest.approx((0.7 + 0.8 + 0.0) / 4, rel=1e-4)
    rel = m.reliability()
    assert rel["pixels"][4] == 1 and rel["pixels"][13] == 2 and rel["pixels"][14] == 1
    assert rel["accuracy"][13] == pytest.approx(0.5) and rel["confidence"][0] is None


def test_apply_temperature_keeps_the_argmax_and_matches_scaled_logits():
    z = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(2)) * 4
    p = torch.softmax(z, 1)
    assert apply_temperature(p, 1.0) is p
    for t in (0.5, 2.0):
        q = apply_temperature(p, t)
        torch.testing.assert_close(q, torch.softmax(z / t, 1), atol=1e-5, rtol=1e-4)
        assert torch.equal(labeled_argmax(q), labeled_argmax(p))
        assert torch.equal(q.argmax(1), p.argmax(1))


# --------------------------------------------------------------------------- the record


def test_calibration_record_round_trip_and_old_files():
    old = Calibration.from_json(None, "e.json")
    assert old.applied == "none" and old.ensemble_temperature == 1.0
    assert old.member_temperature("a") == 1.0
    cal = Calibration("members", 1.3, {"a": 1.2, "b": 0.9}, {"oof": {"none": {"nll": 1.0}}})
    back = Calibration.from_json(json.loads(json.dumps(cal.to_json())), "e.json")
    assert back == cal
    assert back.member_temperature("a") == 1.2 and back.ensemble_temperature == 1.0
    ens = Calibration.from_json({**cal.to_json(), "applied": "ensemble"}, "e.json")
    assert ens.ensemble_temperature == 1.3 and ens.member_temperature("a") == 1.0


@pytest.mark.parametrize("block, names", [
    ({"applied": "ensemble", "temperature": 0}, "calibration.temperature"),
    ({"applied": "ensemble", "temperature": -1.5}, "calibration.temperature"),
    ({"applied": "ensemble", "temperature": float("nan")}, "calibration.temperature"),
    ({"applied": "ensemble", "temperature": "2"}, "calibration.temperature"),
    ({"applied": "members", "members": {"a": float("inf")}}, "calibration.members.a"),
    ({"applied": "sideways"}, "calibration.applied"),
    ([1.0], "'calibration' must be an object"),
])
def test_bad_calibration_blocks_name_the_key(block, names):
    with pytest.raises(InputError, match=names):
        Calibration.from_json(block, "e.json")


# --------------------------------------------------------------------------- a run folder


def overconfident(sharpness: float):
    """Probabilities whose labels follow softmax(z) while they state softmax(sharpness * z):
    the masks are re-drawn from the data's own masks (truth 0 kept) so every T is known."""
    def fn(masks, seed):
        g = torch.Generator().manual_seed(seed)
        m = torch.from_numpy(masks).long()
        z = torch.randn(len(m), 5, *m.shape[1:], generator=g)
        z.scatter_add_(1, m[:, None], torch.full((len(m), 1, *m.shape[1:]), 1.5))
        return torch.softmax(sharpness * z, 1).numpy()
    return fn


def test_calibrate_cli_fits_stores_and_predict_side_reads_it(tmp_path, shards):
    run = make_oof_run(tmp_path / "run", shards, {"a": overconfident(2.0),
                                                  "b": overconfident(3.0)}, n=48)
    res = runner.invoke(app, ["calibrate", "--run", str(run)])
    assert res.exit_code == 0, res.output
    spec = json.loads((run / "ensemble.json").read_text())
    cal = Calibration.from_json(spec["calibration"], "ensemble.json")
    assert cal.applied in ("members", "ensemble")
    # over-confident members: both temperatures soften, b's more than a's
    assert 1.0 < cal.members["a"] < cal.members["b"]
    oof = spec["calibration"]["oof"]
    chosen = oof[cal.applied]
    assert chosen["nll"] < oof["none"]["nll"] and chosen["ece"] < oof["none"]["ece"]
    assert chosen["nll"] == min(oof["members"]["nll"], oof["ensemble"]["nll"])
    assert abs(chosen["miou"] - oof["none"]["miou"]) < 0.01
    for word in ("members", "ensemble", "applied"):
        assert word in res.output


def test_calibrate_cli_bad_inputs_are_one_line_exit_2(tmp_path, shards):
    res = runner.invoke(app, ["calibrate", "--run", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "run folder does not exist" in res.output
    run = make_oof_run(tmp_path / "run", shards, {"a": overconfident(2.0)}, n=48)
    (run / "a" / "fold_1" / "oof.h5").write_bytes(b"not hdf5")
    before = (run / "ensemble.json").read_bytes()
    res = runner.invoke(app, ["calibrate", "--run", str(run)])
    assert res.exit_code == 2, res.output
    assert "fold_1/oof.h5: unreadable out-of-fold file" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert (run / "ensemble.json").read_bytes() == before


# --------------------------------------------------------------------------- predict, evaluate, report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _runfolder import make_npz, make_run

    d = tmp_path_factory.mktemp("calib-run")
    npz = make_npz(d / "labeled.npz", n_train=8, n_test=6, test_masks=True)
    run = make_run(d / "run")
    folds = [{"fold": 0, "val_ids": [0, 1, 2, 3], "train_ids": [4, 5, 6, 7]},
             {"fold": 1, "val_ids": [4, 5, 6, 7], "train_ids": [0, 1, 2, 3]}]
    (run / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))
    with np.load(npz) as z:
        images = z["test_set"]
    return {"run": run, "npz": npz, "images": images, "spec": (run / "ensemble.json").read_text()}


def _calibrate_by_hand(run, block):
    spec = json.loads((run / "ensemble.json").read_text())
    if block is None:
        spec.pop("calibration", None)
    else:
        spec["calibration"] = block
    (run / "ensemble.json").write_text(json.dumps(spec))


def test_the_predictor_applies_member_and_ensemble_temperatures(tiny):
    from marsseg.ensemble import load_ensemble
    from marsseg.inference import PredictConfig, Predictor, forward_views, mean_views

    cfg = PredictConfig(precision="no", batch_size=8)
    ids, x = np.arange(len(tiny["images"])), tiny["images"]
    run = tiny["run"]
    try:
        _calibrate_by_hand(run, None)  # an old ensemble file: T = 1
        raw = Predictor(load_ensemble(run), cfg)(ids, x, want_probs=True, want_disagreement=True)
        _calibrate_by_hand(run, {"applied": "ensemble", "temperature": 2.0,
                                 "members": {"a": 3.0}})
        ens = load_ensemble(run)
        assert ens.temperature == 2.0 and {m.temperature for m in ens.models} == {1.0}
        soft = Predictor(ens, cfg)(ids, x, want_probs=True, want_disagreement=True)
        expect = apply_temperature(torch.from_numpy(raw.probs).float(), 2.0)
        torch.testing.assert_close(torch.from_numpy(soft.probs).float(), expect, atol=2e-3,
                                   rtol=0)
        assert (soft.labels == raw.labels).all()
        assert (soft.disagreement == raw.disagreement).all()
        # per member: each fold model's softmax gets its member's T before the average
        _calibrate_by_hand(run, {"applied": "members", "temperature": 2.0,
                                 "members": {"a": 2.0, "b": 0.5}})
        ens = load_ensemble(run)
        pred = Predictor(ens, cfg)
        got = pred(ids, x, want_probs=True)
        xin = pred.to_input(x)
        with torch.inference_mode():
            want = sum(fm.weight * mean_views(forward_views(
                fm.model, xin, cfg.views, {"a": 2.0, "b": 0.5}[fm.member])) for fm in ens.models)
        torch.testing.assert_close(torch.from_numpy(got.probs).float(), want, atol=2e-3, rtol=0)
        assert not np.allclose(got.probs, raw.probs, atol=1e-2)
        assert load_ensemble(run, calibrated=False).temperature == 1.0
    finally:
        (run / "ensemble.json").write_text(tiny["spec"])


def test_evaluate_reports_nll_and_ece_before_and_after_and_report_draws_them(tiny, tmp_path):
    from marsseg.evaluate import evaluate, format_calibration
    from marsseg.inference import PredictConfig
    from marsseg.report import report

    cfg = PredictConfig(precision="no", batch_size=4)
    run = tiny["run"]
    try:
        plain = evaluate(run, tiny["npz"], cfg=cfg, write=False)
        assert plain["calibration"]["applied"] == "none"
        assert plain["calibration"]["before"]["nll"] == plain["calibration"]["after"]["nll"]
        _calibrate_by_hand(run, {"applied": "ensemble", "temperature": 0.5, "members": {},
                                 "oof": {"none": plain["calibration"]["before"],
                                         "ensemble": plain["calibration"]["after"]}})
        res = evaluate(run, tiny["npz"], cfg=cfg)
        c = res["calibration"]
        assert c["row"] == "ensemble+tta" and c["temperature"] == 0.5
        assert c["before"] == {**plain["calibration"]["before"]}
        assert c["after"]["nll"] != c["before"]["nll"]
        assert c["after"]["pixels"] == c["before"]["pixels"] > 0
        # an ensemble temperature never moves the argmax: same rows as uncalibrated
        assert c["after"]["miou"] == c["before"]["miou"] == res["rows"][-1]["miou"]
        assert [r["miou"] for r in res["rows"]] == [r["miou"] for r in plain["rows"]]
        for key in ("nll", "ece"):
            assert 0 <= c["after"][key] and 0 <= c["before"][key]
        line = format_calibration(res)
        assert "ensemble T=0.500" in line and "NLL" in line and "ECE" in line
        out = report(run, tmp_path / "rep", cfg=cfg)
        assert str(tmp_path / "rep" / "reliability.png") in out["files"]
        assert (tmp_path / "rep" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        (run / "ensemble.json").write_text(tiny["spec"])


def test_predict_probs_file_records_its_temperatures(tiny, tmp_path):
    from marsseg.predict import predict

    run = tiny["run"]
    try:
        _calibrate_by_hand(run, {"applied": "ensemble", "temperature": 1.5})
        predict(run, tiny["npz"], tmp_path / "s.csv", probs_path=tmp_path / "p.h5",
                precision="no", backend="eager", tta=False)
        with h5py.File(tmp_path / "p.h5") as f:
            cal = json.loads(f.attrs["calibration"])
            probs = f["probs"][()]
        assert cal["applied"] == "ensemble" and cal["temperature"] == 1.5
        assert np.allclose(probs.astype(np.float32).sum(1), 1.0, atol=1e-2)
    finally:
        (run / "ensemble.json").write_text(tiny["spec"])
