"""Model registry (name -> builder) and self-describing checkpoints.

Every registered name is the configurable U-Net with some defaults fixed; a
recipe may override any argument. `save_pretrained` writes the weights
(safetensors) and a config ({"model": {"name", "args"}, ...}) under the file names
the run folder owns (`runfolder.WEIGHTS`, `runfolder.CONFIG`); `load_pretrained`
rebuilds the network from that folder alone. Weights are safetensors only:
loading a downloaded ensemble must never run code (no pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .._io import atomic_path
from ..errors import InputError
from ..runfolder import CONFIG as CONFIG_NAME
from ..runfolder import WEIGHTS as WEIGHTS_NAME
from .unet import UNet, UNetConfig

# Presets: the reference report's variants, each a U-Net with fixed defaults.
PRESETS: dict[str, dict] = {
    "unet": {},
    "unet-se": {"se": "bottleneck"},          # the reference's best bottleneck
    "unet-se-all": {"se": "all"},
    "unet-aspp": {"aspp": True},
    "unet-res": {"residual": True},
    "unet-attn": {"attention_gates": True},
    "unet-sa": {"self_attention": True},
    "unet-ds": {"deep_supervision": True},
    "unet-transpose": {"up": "transpose"},
}


def _builder(defaults: dict) -> Callable[..., nn.Module]:
    def build(**args) -> nn.Module:
        return UNet(UNetConfig.from_args({**defaults, **args}))
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {name: _builder(d) for name, d in PRESETS.items()}


def build_model(name: str, **args) -> nn.Module:
    """Build a registered model; `args` override the preset's defaults.

    The model carries `marsseg_name` and `marsseg_args` (every argument, resolved,
    JSON-serialisable) so `save_pretrained` needs nothing else.
    """
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    try:
        model = MODELS[name](**args)
    except TypeError as e:  # a builder registered by hand with a fixed signature
        raise InputError(f"model {name!r}: {e}") from None
    model.marsseg_name = name
    model.marsseg_args = model.config.to_dict() if hasattr(model, "config") else dict(args)
    return model


def to_model_input(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """What every network takes: uint8 images (B, H, W) -> float (B, 1, H, W) in 0..255 (the
    network normalises), channels_last unless told otherwise. Training, validation,
    prediction and backend calibration all convert through here."""
    x = images.unsqueeze(1).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_pretrained(model: nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the weights and config.json into `folder` (created); returns the folder.

    config.json = {"model": {"name", "args"}, "num_classes", "in_channels", **extra}.
    """
    model = unwrap(model)
    if not hasattr(model, "marsseg_name"):
        raise InputError("model was not built by marsseg.models.build_model (no marsseg_name)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = dict(model.marsseg_args)
    config = {"model": {"name": model.marsseg_name, "args": args},
              "num_classes": args.get("num_classes"), "in_channels": args.get("in_channels"),
              **(extra or {})}
    text = json.dumps(config, indent=2) + "\n"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # safetensors' save_file creates the file 0600; bytes through Python follow the umask
    # (0644 by default) like every other file of a run folder.
    blob = save(tensors, metadata={"format": "pt"})
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        tmp.write_bytes(blob)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(text)
    return folder


def load_config(folder: str | os.PathLike) -> dict:
    """Read and check a fold folder's config.json (InputError naming the file)."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing (not a saved model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable config ({e})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if (not isinstance(model, dict) or not isinstance(model.get("name"), str)
            or not isinstance(model.get("args", {}), dict)):
        raise InputError(f"{path}: needs a \"model\" object with \"name\" and \"args\"")
    return config


def load_pretrained(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from `folder` (config.json + weights), in eval mode.

    A missing or corrupt file, or weights that do not match the architecture,
    raise InputError naming the file.
    """
    folder = Path(folder)
    config = load_config(folder)
    try:
        model = build_model(config["model"]["name"], **config["model"].get("args", {}))
    except InputError as e:
        raise InputError(f"{folder / CONFIG_NAME}: {e}") from None
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"{path}: missing weights file")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: corrupt or not a safetensors file ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match model {config['model']['name']!r} "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise InputError(f"{path}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                             f"model expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
