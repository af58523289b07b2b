"""Model registry, U-Net variants and checkpoints.

`check_model` is the one shared tiny-model tester (smp style): every registered
variant and every bottleneck/block option runs through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from marsseg.config import load_recipe
from marsseg.errors import InputError
from marsseg.models import (
    MODELS,
    UNet,
    build_model,
    count_parameters,
    load_pretrained,
    save_pretrained,
)

TINY = {"base_width": 4, "depth": 2}
SHAPE = (2, 1, 16, 32)


def check_model(name: str, **args) -> torch.nn.Module:
    """Forward shape, backward with finite gradients on every parameter,
    parameter count, channels_last forward and bf16 autocast forward (CPU)."""
    torch.manual_seed(0)
    model = build_model(name, **{**TINY, **args})
    x = torch.rand(SHAPE) * 255
    target = torch.randint(0, 5, (SHAPE[0], *SHAPE[2:]))

    model.train()
    out = model(x)
    outs = out if isinstance(out, list) else [out]
    for o in outs:
        assert o.shape == (SHAPE[0], 5, *SHAPE[2:])
        assert torch.isfinite(o).all()
    loss = sum(torch.nn.functional.cross_entropy(o, target) for o in outs)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) and n > 0

    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert isinstance(ref, torch.Tensor) and ref.shape == (SHAPE[0], 5, *SHAPE[2:])
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
        assert half.shape == ref.shape and torch.isfinite(half.float()).all()
    json.dumps(model.marsseg_args)
    assert model.marsseg_name == name
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_variant(name):
    check_model(name)


@pytest.mark.parametrize("args", [
    {"se": "bottleneck"},
    {"se": "all"},
    {"aspp": True, "aspp_rates": [1, 2]},
    {"residual": True},
    {"attention_gates": True},
    {"self_attention": True, "sa_heads": 2},
    {"deep_supervision": True, "depth": 3},
    {"up": "transpose"},
    {"dropout": 0.2},
    {"norm": "group", "act": "gelu"},
    {"norm": "instance", "act": "silu"},
    {"norm": "none", "act": "leaky_relu"},
    {"input_norm": "standardize"},
    # everything at once
    {"se": "all", "aspp": True, "residual": True, "attention_gates": True,
     "self_attention": True, "deep_supervision": True, "up": "transpose", "dropout": 0.1},
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_each_option(args):
    check_model("unet", **args)


LEVER_RECIPES = sorted((Path(__file__).resolve().parents[1] / "ensembles").glob("lever-*.toml"))


def _lever_models() -> list[tuple[str, dict]]:
    """The distinct networks of the lever recipes at a tiny width and depth 2."""
    seen: dict[str, tuple[str, dict]] = {}
    for p in LEVER_RECIPES:
        for m in load_recipe(p, check_models=False).members:
            args = {**m.model.args, **TINY}
            seen.setdefault(json.dumps([m.model.name, args], sort_keys=True), (m.model.name, args))
    return list(seen.values())


@pytest.mark.parametrize("name, args", _lever_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_round2_lever_members_pass_the_shared_tester(name, args):
    """Issue 18's members (attention gates + ASPP, ...): their own arguments at a tiny width
    and depth 2, through the same tester as every registered variant."""
    model = check_model(name, **args)
    assert {k: model.marsseg_args[k] for k in args} == args


def test_round2_has_a_third_differently_built_member():
    """Beside marsseg-best's SE and residual members: attention gates with an ASPP bottleneck."""
    members = {m.name: m.model for p in LEVER_RECIPES
               for m in load_recipe(p, check_models=False).members}
    attn = members["attn-aspp-dice"]
    model = build_model(attn.name, **attn.args)
    assert model.config.attention_gates and model.config.aspp and not model.config.residual
    assert any(type(mod).__name__ == "AttentionGate" for mod in model.modules())
    assert any(type(mod).__name__ == "ASPP" for mod in model.modules())
    assert members["res-ds-wide"].args["base_width"] == 2 * members["res-ds-dice"].args["base_width"]


def test_deep_supervision_outputs():
    model = build_model("unet", base_width=4, depth=3, deep_supervision=True).train()
    out = model(torch.rand(1, 1, 16, 16) * 255)
    assert isinstance(out, list) and len(out) == 3  # main + 2 coarser decoder levels
    assert isinstance(model.eval()(torch.rand(1, 1, 16, 16) * 255), torch.Tensor)


def test_param_counts_order():
    # each option adds parameters on top of the plain U-Net (hand check of the wiring)
    base = count_parameters(build_model("unet", **TINY))
    for args in ({"se": "bottleneck"}, {"aspp": True}, {"residual": True},
                 {"attention_gates": True}, {"self_attention": True}):
        assert count_parameters(build_model("unet", **TINY, **args)) > base, args


def test_plain_unet_param_count_by_hand():
    # depth 1, width 2, BN, nearest: enc conv 1->2 (18) + BN (4) + conv 2->2 (36) + BN (4);
    # bottleneck 2->4 (72+8) and 4->4 (144+8); decoder (4+2)->2 (108+4), 2->2 (36+4);
    # head 2->5 (10 + 5 bias). Convs before a norm have no bias.
    model = build_model("unet", depth=1, base_width=2)
    assert count_parameters(model) == 18 + 4 + 36 + 4 + 72 + 8 + 144 + 8 + 108 + 4 + 36 + 4 + 15


def test_input_scale_and_standardize():
    m = build_model("unet", **TINY)
    x = torch.tensor([0.0, 255.0]).reshape(1, 1, 1, 2)
    assert m.normalize(x).flatten().tolist() == [-1.0, 1.0]
    s = build_model("unet", **TINY, input_norm="standardize")
    y = s.normalize(torch.tensor([10.0, 20.0, 30.0, 40.0]).reshape(1, 1, 2, 2) + 100)
    assert abs(float(y.mean())) < 1e-6 and abs(float(y.std()) - 1.0) < 1e-6
    flat = s.normalize(torch.full((1, 1, 2, 2), 77.0))
    assert torch.equal(flat, torch.zeros_like(flat))


def test_size_not_divisible_is_clear_error():
    model = build_model("unet", base_width=4, depth=3)
    with pytest.raises(InputError, match=r"60x128 .*2\*\*depth = 8"):
        model(torch.zeros(1, 1, 60, 128))
    with pytest.raises(InputError, match=r"\(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 64, 128))


def test_unknown_name_lists_valid_names():
    with pytest.raises(InputError, match="unknown model 'vit'.*unet-se"):
        build_model("vit")


@pytest.mark.parametrize("args,word", [
    ({"widht": 8}, "widht"),
    ({"depth": 0}, "depth"),
    ({"up": "bilinear"}, "up"),
    ({"se": True}, "se"),
    ({"dropout": 1.5}, "dropout"),
    ({"aspp_rates": []}, "aspp_rates"),
    ({"self_attention": True, "base_width": 3, "depth": 1, "sa_heads": 4}, "sa_heads"),
])
def test_bad_args_name_the_arg(args, word):
    with pytest.raises(InputError, match=word):
        build_model("unet", **args)


def test_preset_defaults_and_override():
    m = build_model("unet-se", base_width=4)
    assert m.marsseg_args["se"] == "bottleneck" and m.marsseg_args["base_width"] == 4
    assert build_model("unet-se", se="all", **TINY).marsseg_args["se"] == "all"
    assert isinstance(m, UNet)


def test_save_load_roundtrip(tmp_path):
    model = build_model("unet-attn", base_width=4, depth=2, input_norm="standardize")
    model.train()
    model(torch.rand(4, 1, 16, 32) * 255)  # move BN running stats off their init
    model.eval()
    save_pretrained(model, tmp_path / "fold_0", extra={"fold": 0, "val_miou": 0.5})
    cfg = json.loads((tmp_path / "fold_0" / "config.json").read_text())
    assert cfg["model"]["name"] == "unet-attn" and cfg["fold"] == 0
    assert cfg["num_classes"] == 5 and cfg["in_channels"] == 1
    assert cfg["model"]["args"]["input_norm"] == "standardize"
    assert not list((tmp_path / "fold_0").glob("*.tmp-*"))
    loaded = load_pretrained(tmp_path / "fold_0")
    assert not loaded.training
    x = torch.rand(2, 1, 16, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_pretrained(build_model("unet", **TINY), tmp_path / "f")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert modes == {"model.safetensors": "0o644", "config.json": "0o644"}


def test_save_from_channels_last_and_compiled_wrapper(tmp_path):
    model = build_model("unet", **TINY).to(memory_format=torch.channels_last)

    class Wrapper(torch.nn.Module):  # like DDP: the real model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    save_pretrained(Wrapper(model), tmp_path)
    assert load_pretrained(tmp_path).marsseg_name == "unet"


def test_load_errors_name_the_file(tmp_path):
    model = build_model("unet", **TINY)
    save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"

    # wrong shapes: a config asking for a wider net than the weights
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["args"]["base_width"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="model.safetensors.*shape"):
        load_pretrained(tmp_path)

    # wrong keys: a different architecture
    cfg["model"]["args"]["base_width"] = 4
    cfg["model"]["args"]["se"] = "bottleneck"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="model.safetensors.*missing"):
        load_pretrained(tmp_path)

    cfg["model"]["args"]["se"] = "none"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="model.safetensors.*corrupt"):
        load_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(InputError, match="model.safetensors.*missing"):
        load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(InputError, match="config.json.*missing"):
        load_pretrained(tmp_path)


def test_kaiming_init():
    torch.manual_seed(0)
    model = build_model("unet", base_width=32, depth=2, init="kaiming")
    w = model.encoders[1].conv1[0].weight  # 32 -> 64, 3x3: fan_out = 64*9
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(float(w.detach().std()) / expected_std - 1) < 0.05
    assert float(model.head.bias.detach().abs().sum()) == 0.0


def test_default_init_is_pytorchs():
    """init = "default" keeps nn.Conv2d's own kaiming_uniform(a=sqrt(5)): std = 1/sqrt(3*fan_in)."""
    torch.manual_seed(0)
    model = build_model("unet", base_width=32, depth=2)
    assert model.config.init == "default"
    w = model.encoders[1].conv1[0].weight  # 32 -> 64, 3x3: fan_in = 32*9
    expected_std = (1.0 / (3 * 32 * 9)) ** 0.5
    assert abs(float(w.detach().std()) / expected_std - 1) < 0.05
    assert float(model.head.bias.detach().abs().sum()) > 0.0  # PyTorch's uniform bias init
