"""A configurable U-Net: every variant the reference report tried, by arguments.

Input (B, in_channels, H, W) float with pixel values 0..255; output logits
(B, num_classes, H, W). H and W must be divisible by 2**depth. With
`deep_supervision` the training-mode forward returns [main, aux1, ...] where
aux_i are 1x1-conv heads on the coarser decoder levels (finest first),
bilinearly upsampled to (H, W); eval mode returns the main logits only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .. import IMAGE_SHAPE, NUM_CLASSES
from ..errors import InputError
from .blocks import ACTS, ASPP, NORMS, AttentionGate, ConvBlock, SelfAttention2d, SqueezeExcite

UPSAMPLE = ("nearest", "transpose")
SE_MODES = ("none", "bottleneck", "all")
INPUT_NORMS = ("scale", "unit", "standardize")
INITS = ("default", "kaiming")


@dataclass(frozen=True)
class UNetConfig:
    """All U-Net arguments; `asdict` of this is what config.json stores."""

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    depth: int = 4                  # number of 2x2 max-pool steps
    base_width: int = 32            # channels at full resolution; doubles per level
    norm: str = "batch"             # batch | group | instance | none
    act: str = "relu"               # relu | leaky_relu | gelu | silu
    up: str = "nearest"             # nearest (then concat) | transpose (2x2 transposed conv)
    dropout: float = 0.0            # Dropout2d after the bottleneck and decoder blocks
    se: str = "none"                # squeeze-and-excitation: none | bottleneck | all (every block)
    se_reduction: int = 8
    aspp: bool = False              # ASPP after the bottleneck block
    aspp_rates: list[int] = field(default_factory=lambda: [1, 2, 3])
    residual: bool = False          # residual conv blocks
    attention_gates: bool = False   # additive attention gates on the skips
    self_attention: bool = False    # transformer layer at the bottleneck
    sa_heads: int = 4
    deep_supervision: bool = False  # aux heads on coarser decoder levels (training only)
    input_norm: str = "scale"       # scale: x/255*2-1 | unit: x/255 | standardize: per-image mean/std
    # default: PyTorch's own layer initialisation; kaiming: Kaiming-normal fan-out convs.
    # On real-mars, PyTorch's default trained clearly better (issue 10: +2.5-5 mIoU at 30
    # epochs), so it is the default; config.json files without this key load either way.
    init: str = "default"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InputError(f"model arg {name}={getattr(self, name)!r}: {why}")

        for name in ("in_channels", "num_classes", "depth", "base_width", "se_reduction", "sa_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if self.depth > 6:
            bad("depth", "must be at most 6 (64-pixel-high images)")
        for name, allowed in (("norm", NORMS), ("act", ACTS), ("up", UPSAMPLE), ("se", SE_MODES),
                              ("input_norm", INPUT_NORMS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {', '.join(allowed)}")
        for name in ("aspp", "residual", "attention_gates", "self_attention", "deep_supervision"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be a number in [0, 1)")
        rates = self.aspp_rates
        if (not isinstance(rates, (list, tuple)) or not rates
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates)):
            bad("aspp_rates", "must be a non-empty list of positive integers")
        object.__setattr__(self, "aspp_rates", [int(r) for r in rates])
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.self_attention and self.bottleneck_width % self.sa_heads:
            bad("sa_heads", f"must divide the bottleneck width {self.bottleneck_width}")

    @property
    def bottleneck_width(self) -> int:
        return self.base_width * 2 ** self.depth

    @classmethod
    def from_args(cls, args: dict) -> UNetConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        for k in args:
            if k not in known:
                raise InputError(f"unknown model arg {k!r}; valid: {', '.join(sorted(known))}")
        return cls(**args)

    def to_dict(self) -> dict:
        d = asdict(self)
        json.dumps(d)  # always serialisable by construction; fail loudly if not
        return d


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision's ResNet), unit norms, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with optional SE, ASPP, residual blocks,
    attention gates, bottleneck self-attention and deep supervision."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        widths = [c.base_width * 2 ** i for i in range(c.depth + 1)]
        block = dict(norm=c.norm, act=c.act, residual=c.residual, se_reduction=c.se_reduction)
        se_all = c.se == "all"

        self.encoders = nn.ModuleList()
        cin = c.in_channels
        for w in widths[:-1]:
            self.encoders.append(ConvBlock(cin, w, se=se_all, **block))
            cin = w
        self.pool = nn.MaxPool2d(2)

        bw = widths[-1]
        bottleneck: list[nn.Module] = [ConvBlock(cin, bw, se=se_all, dropout=c.dropout, **block)]
        if c.se == "bottleneck":
            bottleneck.append(SqueezeExcite(bw, c.se_reduction))
        if c.aspp:
            bottleneck.append(ASPP(bw, bw, c.aspp_rates, c.norm, c.act))
        if c.self_attention:
            size = (max(1, IMAGE_SHAPE[0] >> c.depth), max(1, IMAGE_SHAPE[1] >> c.depth))
            bottleneck.append(SelfAttention2d(bw, c.sa_heads, size))
        self.bottleneck = nn.Sequential(*bottleneck)

        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        deep = bw
        for w in reversed(widths[:-1]):
            if c.up == "transpose":
                self.ups.append(nn.ConvTranspose2d(deep, w, 2, stride=2))
                up_w = w
            else:
                self.ups.append(nn.Upsample(scale_factor=2, mode="nearest"))
                up_w = deep
            self.gates.append(AttentionGate(up_w, w) if c.attention_gates else nn.Identity())
            self.decoders.append(ConvBlock(up_w + w, w, se=se_all, dropout=c.dropout, **block))
            deep = w
        self.head = nn.Conv2d(widths[0], c.num_classes, 1)
        # aux heads on every decoder level but the last (finest first in the output list)
        self.aux_heads = nn.ModuleList(
            [nn.Conv2d(w, c.num_classes, 1) for w in widths[1:-1]]
            if c.deep_supervision else [])
        if c.init == "kaiming":
            _init_weights(self)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw 0..255 pixels to the network's input scale (see `input_norm`)."""
        x = x.float()
        if self.config.input_norm == "scale":
            return x * (2.0 / 255.0) - 1.0
        if self.config.input_norm == "unit":
            return x * (1.0 / 255.0)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        # floor of 1 grey level: a flat image maps to zeros, not amplified noise
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
        return (x - mean) / std

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        m = 2 ** c.depth
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise InputError(f"model input must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        if h % m or w % m:
            raise InputError(f"input size {h}x{w} is not divisible by 2**depth = {m} "
                             f"(depth={c.depth}); pad or crop to a multiple of {m}")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        size = x.shape[2:]
        x = self.normalize(x)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        feats = []
        for up, gate, dec, skip in zip(self.ups, self.gates, self.decoders, reversed(skips), strict=True):
            x = up(x)
            s = gate(x, skip) if isinstance(gate, AttentionGate) else skip
            x = dec(torch.cat([x, s], dim=1))
            feats.append(x)
        out = self.head(x)
        if not (self.aux_heads and self.training):
            return out
        aux = [F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)
               for head, f in zip(self.aux_heads, reversed(feats[:-1]), strict=True)]
        return [out, *aux]
