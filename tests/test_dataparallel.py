"""Data-parallel folds (--workers-per-fold): 2 gloo processes on CPU.

The loop tests start the processes with torch.multiprocessing (train_one_fold finds the
process group as it does under Ray Train); the Ray tests run the CLI's own path.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from marsseg import train as train_mod
from marsseg.cli import app
from marsseg.config import load_recipe
from marsseg.data.loaders import make_loaders
from marsseg.dataparallel import GlobalBatchNorm2d, check_batch, rank_seed, sync_batchnorm
from marsseg.device import make_accelerator
from marsseg.errors import InputError
from marsseg.models.registry import build_model
from marsseg.orchestrate import RunOptions
from marsseg.train import train_one_fold
from marsseg.validation import validate

runner = CliRunner()

# No augmentation, plain cross entropy, no clipping: one worker's loss on 16 images is the
# mean of two workers' losses on 8 each, so their gradients must agree (see test (c)).
RECIPE = """folds = 2
seed = 11
[[members]]
name = "a"
epochs = {epochs}
batch_size = 16
grad_clip = 0
[members.model]
name = "unet"
args = {{ base_width = 4, depth = 2 }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def spy_on_steps(log: dict) -> None:
    """Wrap train._train_step: first-step gradients (after DDP's all-reduce) and a digest of
    every parameter and buffer after each optimiser step go into `log`."""
    orig = train_mod._train_step

    def step(f, images, masks, lr):
        if "batch" not in log:
            model = f.accelerator.unwrap_model(f.model)
            log.update(batch=images.clone(), masks=masks.clone(),
                       init={k: v.clone() for k, v in model.state_dict().items()})
        inner = f.optimizer.step

        def record_grads(*a, **k):
            if "grads" not in log:
                model = f.accelerator.unwrap_model(f.model)
                log["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            return inner(*a, **k)

        f.optimizer.step = record_grads
        try:
            out = orig(f, images, masks, lr)
        finally:
            f.optimizer.step = inner
        log.setdefault("digests", []).append(digest(f.accelerator.unwrap_model(f.model)))
        return out

    train_mod._train_step = step


def _fold_worker(rank, world, port, recipe_path, shards, out, result_dir):
    join_group(rank, world, port)
    log = {}
    spy_on_steps(log)
    done = train_one_fold(load_recipe(recipe_path), "a", 0, shards, out, precision="no",
                          threads=1)
    torch.save({"log": log, "done": done.to_json()}, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_worker_fold(shards, tmp_path_factory):
    """One fold trained by 2 gloo processes (1 epoch) and by 1 process: (tmp, runs, logs)."""
    tmp = tmp_path_factory.mktemp("dp")
    recipe = tmp / "r.toml"
    recipe.write_text(RECIPE.format(epochs=1))
    mp.spawn(_fold_worker, args=(2, free_port(), str(recipe), str(shards), str(tmp / "two"),
                                 str(tmp)), nprocs=2, join=True)
    logs = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = {}
    orig = train_mod._train_step
    try:
        spy_on_steps(one)
        train_one_fold(load_recipe(recipe), "a", 0, shards, tmp / "one", precision="no", threads=1)
    finally:
        train_mod._train_step = orig
    return tmp, logs, one


def exact_first_step_grads(log: dict) -> dict:
    """float64 gradients of the logged first step (weights, batch, loss of the 1-worker fold)."""
    from marsseg.validation import to_model_input

    model = build_model("unet", base_width=4, depth=2)
    model.load_state_dict(log["init"])
    model = model.double().to(memory_format=torch.channels_last).train()
    norm = model.normalize
    model.normalize = lambda t: norm(t).double()
    logits = model(to_model_input(log["batch"]))
    torch.nn.functional.cross_entropy(logits, log["masks"].long()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def rel_error(grads: dict, exact: dict) -> float:
    return max(((grads[n].double() - exact[n]).abs().max() / exact[n].abs().max()).item()
               for n in exact)


def test_a_ranks_hold_bit_identical_weights_after_every_step(two_worker_fold):
    _, (r0, r1), _ = two_worker_fold
    assert len(r0["log"]["digests"]) >= 3  # several optimiser steps
    assert r0["log"]["digests"] == r1["log"]["digests"]
    assert r0["done"] == r1["done"] and r0["done"]["workers"] == 2  # rank 1 returns rank 0's


def test_c_first_step_gradients_of_2x8_match_1x16(two_worker_fold):
    _, (r0, r1), one = two_worker_fold
    g2, g1 = r0["log"]["grads"], one["grads"]
    # the global batch split in two: rank 0 the first 8 images, rank 1 the next 8
    assert torch.cat([r0["log"]["batch"], r1["log"]["batch"]]).equal(one["batch"])
    for name in g1:
        assert g2[name].equal(r1["log"]["grads"][name]), name  # all-reduced: the same on both
    # Both against the exact (float64) gradient of that step: torch's own fp32 BatchNorm
    # backward on channels_last CPU tensors is the less exact of the two (README).
    exact = exact_first_step_grads(one)
    err1, err2 = rel_error(g1, exact), rel_error(g2, exact)
    assert err2 <= 1e-3, err2  # float tolerance of the global-batch gradient
    assert err2 <= err1 * 1.01 + 1e-6, (err1, err2)


def test_only_rank_0_writes_and_the_fold_loads_as_a_plain_network(two_worker_fold):
    from marsseg.models.registry import load_pretrained

    tmp, _, _ = two_worker_fold
    fold = tmp / "two" / "a" / "fold_0"
    rows = [json.loads(x) for x in (fold / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and rows[0]["workers"] == 2
    trainer = json.loads((fold / "state" / "trainer.json").read_text())
    assert trainer["workers"] == 2
    assert sorted(p.name for p in (fold / "state").glob("random_states_*")) == ["random_states_0.pkl"]
    model = load_pretrained(fold)  # GlobalBatchNorm2d saved under BatchNorm2d's names
    assert not any(isinstance(m, GlobalBatchNorm2d) for m in model.modules())
    # 1 worker: no "workers" anywhere, as before this option existed
    one = tmp / "one" / "a" / "fold_0"
    assert "workers" not in json.loads((one / "done.json").read_text())
    assert "workers" not in json.loads((one / "state" / "trainer.json").read_text())


def _validate_worker(rank, world, port, result_dir):
    if world > 1:
        join_group(rank, world, port)
    torch.manual_seed(0)
    model = build_model("unet", base_width=4, depth=2).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (13, 64, 128), dtype=np.uint8)  # 13: an uneven last batch
    masks = rng.integers(0, 5, (13, 64, 128), dtype=np.uint8)
    acc = make_accelerator("no", cpu=True, split_batches=world > 1)
    _, val = make_loaders((images, masks), (images, masks), 4, torch.Generator())
    model, val = acc.prepare(model, val)
    probs = np.zeros((13, 5, 64, 128), np.float16)
    cm = validate(model, val, acc, probs_out=probs)
    if rank == 0:
        np.savez(os.path.join(result_dir, f"val{world}.npz"), cm=cm, probs=probs,
                 labeled=int((masks > 0).sum()))
    if world > 1:
        dist.destroy_process_group()


def test_b_validation_counts_every_pixel_once_with_an_uneven_last_batch(tmp_path):
    mp.spawn(_validate_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    _validate_worker(0, 1, 0, str(tmp_path))
    two, one = np.load(tmp_path / "val2.npz"), np.load(tmp_path / "val1.npz")
    assert two["cm"].sum() == one["cm"].sum() == two["labeled"]  # each labeled pixel once
    assert (two["cm"] == one["cm"]).all()
    assert np.abs(two["probs"].astype(np.float32) - one["probs"]).max() < 1e-3  # in order


def _bn_worker(rank, world, port, result_dir):
    join_group(rank, world, port)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 7, dtype=torch.float64) * 3 + 1
    net = torch.nn.BatchNorm2d(3).double()
    net.weight.data.uniform_(0.5, 1.5)
    net.bias.data.uniform_(-1, 1)
    glob = sync_batchnorm(torch.nn.Sequential(net), cuda=False)[0]
    part = x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    y = glob(part)
    weights = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape)[rank * 4:(rank + 1) * 4]
    (y * weights).sum().backward()  # the two ranks' losses add up to the whole batch's
    for p in glob.parameters():
        dist.all_reduce(p.grad)
    if rank == 0:
        torch.save({"y": y.detach(), "xgrad": part.grad, "wgrad": glob.weight.grad,
                    "bgrad": glob.bias.grad, "rm": glob.running_mean, "rv": glob.running_var},
                   os.path.join(result_dir, "bn.pt"))
    dist.destroy_process_group()


def test_global_batchnorm_on_gloo_equals_batchnorm_of_the_whole_batch(tmp_path):
    # torch's SyncBatchNorm refuses CPU tensors; ours must give BatchNorm2d's exact math.
    mp.spawn(_bn_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "bn.pt")
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 5, 7, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    ref = torch.nn.BatchNorm2d(3).double()
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-1, 1)
    y = ref(x)
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    torch.testing.assert_close(got["y"], y.detach()[:4])
    torch.testing.assert_close(got["xgrad"], x.grad[:4])
    torch.testing.assert_close(got["wgrad"], ref.weight.grad)
    torch.testing.assert_close(got["bgrad"], ref.bias.grad)
    torch.testing.assert_close(got["rm"], ref.running_mean)
    torch.testing.assert_close(got["rv"], ref.running_var)


def test_torch_syncbatchnorm_refuses_cpu_which_is_why_we_have_our_own(tmp_path):
    # the machine fact the CPU path is built around (torch's message names GPU / XPU)
    mp.spawn(_syncbn_cpu_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert "GPU" in (tmp_path / "err.txt").read_text()


def _syncbn_cpu_worker(rank, world, port, result_dir):
    join_group(rank, world, port)
    bn = torch.nn.SyncBatchNorm(3)
    try:
        bn(torch.randn(2, 3, 4, 4))
    except ValueError as e:
        if rank == 0:
            with open(os.path.join(result_dir, "err.txt"), "w") as fh:
                fh.write(str(e))
    dist.destroy_process_group()


def test_without_a_group_global_batchnorm_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    a = torch.nn.BatchNorm2d(3)
    b = sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), cuda=False)[0]
    assert isinstance(b, GlobalBatchNorm2d)
    assert a(x).equal(b(x)) and a.running_var.equal(b.running_var)


def test_global_batch_must_split_evenly_and_rank_0_draws_as_before():
    check_batch(16, 2, "a")
    check_batch(15, 1, "a")
    with pytest.raises(InputError, match="batch_size 10 does not split over --workers-per-fold 4"):
        check_batch(10, 4, "a")
    assert rank_seed(123, 0) == 123 and rank_seed(123, 1) != 123


# --- options: one line, exit 2, nothing written ---------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--workers-per-fold", "3"], "batch_size 16 does not split over --workers-per-fold 3"),
    (["--workers-per-fold", "0"], "--workers-per-fold must be >= 1"),
    (["--gpus-per-task", "2"], "--gpus-per-task 2: a fold's worker trains on one GPU"),
    (["--workers-per-fold", "2", "--gpus-per-task", "0.5"], "give --gpus-per-task 1"),
    (["--workers-per-fold", "2", "--sequential"], "not with --sequential"),
    (["--workers-per-fold", "2", "--time-budget", "1m"], "--time-budget: not with"),
    (["--workers-per-fold", "64"], "x --workers-per-fold 64: this machine has"),
])
def test_cli_refuses_bad_worker_options(shards, tmp_path, args, words):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(epochs=1).replace("batch_size = 16", "batch_size = 64")
                      if "64" in args else RECIPE.format(epochs=1))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train-folds", "--data", str(shards), "--recipe", str(recipe),
                              "--out", str(out), "--progress", "none", *args])
    assert res.exit_code == 2, res.output
    assert words in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()


def test_one_worker_keeps_the_plain_task():
    # none of these is refused (check raises InputError on a refused combination)
    assert RunOptions().check() is None
    assert RunOptions(gpus_per_task=1, precision="bf16").check() is None  # a GPU per fold
    assert RunOptions(workers_per_fold=2, gpus_per_task=1, precision="bf16").check() is None


# --- on Ray Train --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_two_worker_run(shards, tmp_path_factory, real_cli):
    """`train-folds --workers-per-fold 2` on Ray, fold 0's rank-0 worker killed mid-epoch
    after an epoch was saved: (run folder, pid killed, epoch it was in)."""
    tmp = tmp_path_factory.mktemp("ray-dp")
    recipe = tmp / "r.toml"
    recipe.write_text(RECIPE.format(epochs=4))
    out = tmp / "run"
    fold = out / "a" / "fold_0"
    killed = []

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            try:
                rows = [json.loads(x) for x in (fold / "metrics.jsonl").read_text().splitlines()]
            except (FileNotFoundError, json.JSONDecodeError):
                rows = []
            if rows and (fold / "state" / "trainer.json").exists():
                time.sleep(0.5)  # into the next epoch
                os.kill(rows[-1]["worker"]["pid"], signal.SIGKILL)
                killed.append((rows[-1]["worker"]["pid"], rows[-1]["epoch"] + 1))
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = real_cli.run(["train-folds", "--data", shards, "--recipe", recipe, "--out", out,
                        "--workers-per-fold", "2", "--progress", "plain", "--max-retries", "2"],
                       timeout=900)
    t.join(5)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, killed, res


@pytest.mark.slow
def test_d_two_worker_fold_killed_mid_epoch_resumes_and_finishes(ray_two_worker_run):
    out, killed, res = ray_two_worker_run
    assert killed, "fold 0 finished before its worker could be killed"
    rows = [json.loads(x) for x in (out / "a" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(4))  # no epoch twice, none lost
    assert all(r["workers"] == 2 for r in rows)
    dead = killed[0][0]
    assert any(r.get("resumed") for r in rows) and rows[-1]["worker"]["pid"] != dead
    for k in (0, 1):
        done = json.loads((out / "a" / f"fold_{k}" / "done.json").read_text())
        assert done["workers"] == 2 and done["epochs_run"] == 4
    assert "a fold 1: done" in res.stdout  # the progress board still reports (rank 0)


@pytest.mark.slow
def test_e_two_worker_run_loads_in_predict_and_evaluate(ray_two_worker_run, shards, tmp_path):
    out, _, _ = ray_two_worker_run
    ens = json.loads((out / "ensemble.json").read_text())
    assert 0 <= ens["oof_miou_ensemble"] <= 1
    csv = tmp_path / "s.csv"
    res = runner.invoke(app, ["predict", "--ensemble", str(out), "--data", str(shards),
                              "--out", str(csv), "--backend", "eager", "-q"])
    assert res.exit_code == 0, res.output
    assert csv.read_text().startswith("id,0,1")
    res = runner.invoke(app, ["evaluate", "--ensemble", str(out), "--data", str(shards),
                              "--backend", "eager"])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_sigterm_during_a_two_worker_fold_exits_143_and_resumes(shards, tmp_path, real_cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(epochs=4))
    run = tmp_path / "run"
    args = ["train-folds", "--data", str(shards), "--recipe", str(recipe), "--out", str(run),
            "--progress", "plain", "--folds", "0", "--workers-per-fold", "2"]
    proc = real_cli.start(args)
    state = run / "a" / "fold_0" / "state" / "trainer.json"
    real_cli.wait_for(proc, state.exists, "fold 0 saves an epoch", timeout=400)
    rc, err = real_cli.terminate(proc)
    assert rc == 143, err
    assert err.splitlines()[-1:] == ["terminated"] and "Traceback" not in err, err
    # another worker count is refused before Ray starts; the same one resumes and finishes
    res = runner.invoke(app, args[:-2] + ["--workers-per-fold", "1"])
    assert res.exit_code == 2 and "resume it with --workers-per-fold 2" in res.output, res.output
    res = real_cli.run(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "a" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(4)) and any(r.get("resumed") for r in rows)


def test_train_folds_sbatch_passes_workers_per_fold():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "slurm" / "train-folds.sbatch").read_text()
    assert "WORKERS_PER_FOLD=${WORKERS_PER_FOLD:-1}" in text
    assert '--workers-per-fold "$WORKERS_PER_FOLD"' in text
