"""Learning-rate schedules: linear warmup from 0 to the peak, then cosine / linear decay to
`min_lr_ratio * peak` at the last optimizer step, or constant.

`step` counts the optimizer updates already applied (optax's convention: 0 for the first
update). With W = warmup_steps, T = total_steps, floor = min_lr_ratio * peak:

    step < W:   lr = peak * step / W                              (the first update has lr 0)
    step >= W:  t = min((step - W) / max(T - W, 1), 1)
                cosine:   floor + (peak - floor) * (1 + cos(pi t)) / 2
                linear:   peak - (peak - floor) * t
                constant: peak

`min_lr_ratio` defaults to 0 (decay to zero). Built from optax's `linear_schedule`,
`cosine_decay_schedule`, `constant_schedule` and `join_schedules`.
"""
from __future__ import annotations

import math

import numpy as np
import optax

SCHEDULERS = ("cosine", "linear", "constant")


def make_schedule(peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
    """lr(step) as documented in the module docstring (a jittable function of the step)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {SCHEDULERS}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    span = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, span, alpha=min_lr_ratio)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, min_lr_ratio * peak, span)
    else:
        decay = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def steps_per_epoch(micro_batches_per_bucket: list[int], accumulation_steps: int) -> int:
    """Optimizer steps of one epoch: accumulation groups never mix length buckets, and the last
    partial group of each bucket counts as one step (ceil)."""
    return sum(math.ceil(n / accumulation_steps) for n in micro_batches_per_bucket)


def layer_decay_factors(no_blocks: int, decay: float) -> np.ndarray:
    """[no_blocks] LR multipliers decay**(no_blocks - 1 - i): 1 for the last block."""
    return decay ** np.arange(no_blocks - 1, -1, -1, dtype=np.float64)
