"""U-Net building blocks: conv block (plain or residual), squeeze-and-excitation,
ASPP, attention gate, bottleneck self-attention.

Shapes are (B, C, H, W) throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "instance", "none")
ACTS = ("relu", "leaky_relu", "gelu", "silu")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # 8 channels per group, at least one group; channels are powers of two here.
        groups = max(1, channels // 8)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def make_act(kind: str) -> nn.Module:
    return {"relu": lambda: nn.ReLU(inplace=True),
            "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
            "gelu": nn.GELU,
            "silu": lambda: nn.SiLU(inplace=True)}[kind]()


def conv_norm_act(cin: int, cout: int, norm: str, act: str, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=norm == "none"),
                         make_norm(norm, cout), make_act(act))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from global average pooling."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class ConvBlock(nn.Module):
    """Two 3x3 conv + norm + act; optionally residual (ResNet basic block), SE and dropout.

    Residual: conv-norm-act-conv-norm (+SE) + shortcut (1x1 conv when the width
    changes), then act. Dropout2d comes last.
    """

    def __init__(self, cin: int, cout: int, norm: str = "batch", act: str = "relu",
                 residual: bool = False, se: bool = False, se_reduction: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        self.residual = residual
        self.conv1 = conv_norm_act(cin, cout, norm, act)
        if residual:
            self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"),
                                       make_norm(norm, cout))
            self.shortcut = (nn.Identity() if cin == cout else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, bias=norm == "none"),
                                           make_norm(norm, cout)))
            self.act = make_act(act)
        else:
            self.conv2 = conv_norm_act(cout, cout, norm, act)
        self.se = SqueezeExcite(cout, se_reduction) if se else nn.Identity()
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.conv2(self.conv1(x)))
        if self.residual:
            y = self.act(y + self.shortcut(x))
        return self.drop(y)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017, DeepLab v3).

    Branches: 1x1 conv, one 3x3 conv per dilation rate, and image-level global
    average pooling broadcast back; concatenated and projected by a 1x1 conv.
    Branches are `cout // 4` wide (DeepLab: 256 for 2048 in), so ASPP at a
    512-channel bottleneck adds ~2.5 M parameters rather than ~10 M.
    """

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (1, 2, 3),
                 norm: str = "batch", act: str = "relu", branch_channels: int | None = None):
        super().__init__()
        cb = branch_channels or max(4, cout // 4)
        self.branches = nn.ModuleList([conv_norm_act(cin, cb, norm, act, k=1)] +
                                      [conv_norm_act(cin, cb, norm, act, k=3, dilation=r)
                                       for r in rates])
        # no norm on the pooled branch: its spatial size is 1x1, so batch
        # statistics of a batch of one would be degenerate.
        self.pool = nn.Sequential(nn.Conv2d(cin, cb, 1), make_act(act))
        self.project = conv_norm_act(cb * (len(rates) + 2), cout, norm, act, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [b(x) for b in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        feats.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(feats, dim=1))


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, Attention U-Net).

    `g` (decoder feature, already upsampled to the skip's size) decides which
    skip pixels pass: skip * sigmoid(psi(act(Wg g + Wx skip))).
    """

    def __init__(self, g_channels: int, x_channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or max(4, x_channels // 2)
        self.wg = nn.Conv2d(g_channels, inter, 1)
        self.wx = nn.Conv2d(x_channels, inter, 1, bias=False)
        self.psi = nn.Conv2d(inter, 1, 1)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.psi(F.relu(self.wg(g) + self.wx(x))))
        return x * a


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map.

    Pre-norm transformer layer: x + Attn(GN(x)), then x + MLP(GN(x)), with a
    learned positional embedding added per position (interpolated when the
    map size differs from the one it was built for).
    """

    def __init__(self, channels: int, heads: int = 4, size: tuple[int, int] = (4, 8)):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.GroupNorm(1, channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(),
                                 nn.Conv2d(2 * channels, channels, 1))
        self.pos = nn.Parameter(torch.zeros(1, channels, *size))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pos = self.pos if self.pos.shape[2:] == (h, w) else F.interpolate(
            self.pos, size=(h, w), mode="bilinear", align_corners=False)
        y = self.norm1(x) + pos
        t = y.flatten(2).transpose(1, 2)  # (B, HW, C)
        a, _ = self.attn(t, t, t, need_weights=False)
        x = x + a.transpose(1, 2).reshape(b, c, h, w)
        return x + self.mlp(self.norm2(x))
