"""A fold's optimizer and its learning-rate schedule (the recipe's optimizer and schedule tables).

`make_optimizer` builds AdamW or SGD with weight decay on weights only (or on every
parameter: ``decay_norms``); `lr_at` is the schedule as a pure function of the step,
which the loop sets on the optimizer before every step.
"""

from __future__ import annotations

import math

import torch

from .config import OptimizerConfig, ScheduleConfig


def make_optimizer(cfg: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # decay_norms = false: no weight decay on norms and biases (1-d tensors), as is common
    # for conv nets; true: decay on every parameter (plain torch.optim with weight_decay).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1 or cfg.decay_norms]
    no_decay = [p for p in params if p.ndim <= 1 and not cfg.decay_norms]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(schedule: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int,
          epochs: int, plateau_scale: float = 1.0) -> float:
    """Learning rate for optimizer step `step` (0-based) under `schedule`.

    Linear warmup over `warmup_epochs`, then constant / cosine to
    `min_lr_ratio * base_lr` at the last step / x`gamma` every `step_epochs` /
    `plateau_scale` (decayed by the loop when validation stalls).
    """
    warm = schedule.warmup_epochs * steps_per_epoch
    if step < warm:
        return base_lr * (step + 1) / warm
    if schedule.name == "cosine":
        total = max(1, epochs * steps_per_epoch - warm)
        t = min(1.0, (step - warm) / total)
        lo = schedule.min_lr_ratio * base_lr
        return lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule.name == "step":
        return base_lr * schedule.gamma ** ((step // steps_per_epoch) // schedule.step_epochs)
    if schedule.name == "plateau":
        return base_lr * plateau_scale
    return base_lr
