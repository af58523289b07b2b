"""Data-parallel folds without Ray: what a fold's loop needs when N processes train it
(the world it is in, global-batch BatchNorm, per-rank seeds; the Accelerator: `device`).

`train.train_one_fold` runs the same in one process or in each of N processes of a
torch.distributed group (Ray Train's TorchTrainer in `raytrain`, or `torchrun`):
accelerate finds the group, splits every global batch across the ranks
(`split_batches=True`: batch_size stays the global batch, each rank takes
batch_size / N of the same shuffled batch) and all-reduces the gradients (DDP).

BatchNorm: each rank would normalise its own batch_size / N images, so N workers
would not train the network one worker trains. `sync_batchnorm` makes the batch
statistics global: torch's `SyncBatchNorm` on CUDA (NCCL, fused kernels), and on
CPU, where torch's refuses to run, `GlobalBatchNorm2d` below (the same sums through
differentiable all-reduces over gloo). Both keep BatchNorm's parameter and buffer
names, so saved weights load into the plain network.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError


def world() -> tuple[int, int]:
    """(rank, world size) of this process's torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batch(batch_size: int, workers: int, member: str) -> None:
    """batch_size is the global batch: it must split evenly over `workers` (InputError)."""
    if workers > 1 and batch_size % workers:
        raise InputError(f"member {member!r}: batch_size {batch_size} does not split over "
                         f"--workers-per-fold {workers} (the global batch must be a multiple "
                         f"of the workers; each takes batch_size / {workers})")


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps `seed` (one process draws exactly as before); other ranks draw their own."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) & 0x7FFFFFFF


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (the loss is the sum of
    every rank's loss, DDP then averages the parameters' gradients)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over every rank.

    Works on any backend (gloo on CPU too): per-channel sums go through an all-reduce
    whose backward all-reduces the gradients, so the gradient is that of one process
    normalising the whole batch. Two passes (mean, then centred squares) as BatchNorm's own kernels are exact
    to float tolerance. Evaluation, and training without a group, is plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # sums in >= fp32
        dims = (0, 2, 3)
        c = xf.shape[1]
        local_n = xf.new_full((1,), xf.numel() / c)  # pixels per channel on this rank
        sums = all_reduce(torch.cat([xf.sum(dims), local_n]))
        n = float(sums[c].detach())
        mean = sums[:c] / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        self.num_batches_tracked.add_(1)
        m = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def _to_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        like = next(iter(module.state_dict().values()), None)
        floats = [t for t in (module.weight, module.running_mean) if t is not None]
        out = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats,
                                device=like.device if like is not None else None,
                                dtype=floats[0].dtype if floats else None)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out


def sync_batchnorm(model: nn.Module, cuda: bool) -> nn.Module:
    """`model` with every BatchNorm computing global-batch statistics (module docstring)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global(model)
