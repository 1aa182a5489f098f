"""Learning-rate schedule: linear warm-up then cosine decay to zero.

The reference lr of 1e-3 diverges on LLM backbones without warm-up (METHOD.md), so
warm-up is part of every training run, not an option.
"""
from __future__ import annotations

import math
import warnings

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps))


def resume_at(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Put a freshly built `scheduler` at optimiser step `step`, as after `step` steps.

    A resumed run replays its (possibly re-lengthened) schedule before any optimiser step
    has run in the new process; torch warns about exactly that order, wrongly here.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
