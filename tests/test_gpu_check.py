"""make gpu-check's CPU-only parts: its arguments, no-GPU refusal, and the CPU half of the
GPU-vs-CPU label comparison (bench/gpu_check.py; the GPU half needs a GPU)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from _runfolder import make_npz, make_run

from bench import gpu_check
from marsseg.submission import read_submission

ROOT = gpu_check.ROOT


def test_defaults_check_bf16_and_fp16_within_half_a_percent(tmp_path):
    a = gpu_check.parse_args(["--out", str(tmp_path / "gc")])
    assert a.precisions == ["bf16", "fp16"] and a.max_diff == 0.005 and a.epochs == 2
    assert a.recipe.name == "seed-final.toml"


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--n-train", "10"], "--n-train 10: 2 folds need"),
    (["--max-diff", "1.5"], "--max-diff must be in [0, 1)"),
    (["--precisions", "fp8"], "--precisions: fp8"),
    (["--recipe", "nope.toml"], "--recipe nope.toml: no such file"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_non_empty_out_folder_is_refused(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path)])
    assert "exists and is not an empty folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "gc")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "sees no CUDA device" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "gc").exists()


def test_ci_script_refuses_a_python_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([str(ROOT / ".ci" / "gpu-check")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                            "VENV": sys.prefix, "GPU_VENV": str(tmp_path / "v")})
    assert r.returncode == 2 and "sees a CUDA device" in r.stderr, r.stderr
    assert not (tmp_path / "v").exists()  # nothing made, nothing installed


def test_ci_script_venv_sees_the_packages_of_a_python_that_is_itself_a_venv(tmp_path):
    """Images often ship their CUDA torch inside a venv (e.g. /opt/torch/.venv): the
    .venv-gpu made from it must see that venv's packages, not only the base interpreter's.
    A stand-in torch (CUDA "available") and marsseg live only in the parent venv."""
    parent = tmp_path / "parent"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(parent)], check=True)
    site = subprocess.run([str(parent / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, body in (("torch", "class cuda:\n    is_available = staticmethod(lambda: True)\n"),
                       ("marsseg", "")):
        (tmp_path / "parent" / site / name).mkdir(parents=True)
        (tmp_path / "parent" / site / name / "__init__.py").write_text(body)
    r = subprocess.run([str(ROOT / ".ci" / "gpu-check")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": str(parent / "bin" / "python"),
                            "VENV": str(tmp_path / "none"), "GPU_VENV": str(tmp_path / "v")})
    # torch and marsseg are found through the parent venv; the rest is named as missing
    assert r.returncode == 2 and "lacks accelerate" in r.stderr, r.stderr
    assert "torch" not in r.stderr.split("lacks")[1].split("(")[0], r.stderr


def test_cpu_half_of_the_label_comparison(tmp_path):
    run = make_run(tmp_path / "run", members=("a",))
    data = make_npz(tmp_path / "d.npz", n_train=4, n_test=6, test_masks=True)
    csv, img_s = gpu_check.cpu_reference(run, data, tmp_path)
    assert csv == tmp_path / "run-cpu-fp32.csv" and img_s > 0
    ids, masks = read_submission(csv)
    assert len(ids) == 6
    assert gpu_check.label_diff(csv, csv) == 0.0
    # a stand-in for the GPU's labels: 1% of the pixels changed
    other = tmp_path / "other.csv"
    masks = masks.reshape(len(ids), -1)
    flat = masks.copy()
    flat[:, : flat.shape[1] // 100] = (flat[:, : flat.shape[1] // 100] % 4) + 1
    with open(other, "w") as fh:
        fh.write(csv.read_text().splitlines()[0] + "\n")
        for i, row in zip(ids, flat, strict=True):
            fh.write(f"{i}," + ",".join(map(str, row)) + "\n")
    share = gpu_check.label_diff(other, csv)
    assert 0 < share <= 0.01 + 1e-9 and np.isclose(share, (flat != masks).mean())
