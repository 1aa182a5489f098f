"""The sweep's search space and how many trials run at once.

Search space (sampled by Optuna TPE through Ray Tune):
- student depth: a choice among the given layer counts;
- learning rate: log-uniform over [lo, hi];
- each loss weight (cos, l2, ms): log-uniform over [lo, hi] and, with zero allowed, an
  on/off switch sampled next to it (off = weight exactly 0). A log-uniform range cannot
  contain 0, and "is this term useful at all" is a question of its own, so it gets its own
  parameter. A range with lo == hi fixes the weight, with no switch (0 0 removes the term).

Blocks follow depth: B = the largest divisor of gcd(teacher depth, student depth) that
is <= --blocks, so every sampled depth pairs equal blocks with the teacher (8-layer
teacher, --blocks 4: depth 1 -> B=1, 2 -> 2, 3 -> 1, 4 -> 4, 6 -> 2). With B = 1 there
is no intermediate block for a multiple-supervision head, so that trial's ms weight is 0
(the table records the weights each trial really used).

Everything here but `search_space` is plain Python, unit-testable without Ray.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

WEIGHTS = ("cos", "l2", "ms")


def blocks_for(teacher_layers: int, student_layers: int, max_blocks: int) -> int:
    """Largest B <= max_blocks dividing both depths (equal blocks on both sides)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student depth {student_layers} must be in 1..{teacher_layers} (the teacher's depth)")
    if max_blocks < 1:
        raise ValueError(f"--blocks must be >= 1, got {max_blocks}")
    common = math.gcd(teacher_layers, student_layers)
    return max(b for b in range(1, min(common, max_blocks) + 1) if common % b == 0)


def check_range(name: str, bounds: Sequence[float], allow_zero_fixed: bool) -> tuple[float, float]:
    """(lo, hi) with 0 < lo < hi for a log-uniform range, or lo == hi for a constant."""
    if len(bounds) != 2:
        raise ValueError(f"--{name}-range takes two numbers LO HI, got {list(bounds)}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if lo == hi and (lo > 0 or (allow_zero_fixed and lo == 0)):
        return lo, hi
    if not 0 < lo < hi or not math.isfinite(hi):
        raise ValueError(f"--{name}-range {lo:g} {hi:g}: need 0 < LO < HI (log-uniform) or LO == HI "
                         f"(a constant{', 0 to drop the term' if allow_zero_fixed else ''})")
    return lo, hi


def search_space(depths: Sequence[int], lr_range: tuple[float, float],
                 weight_ranges: dict[str, tuple[float, float]], allow_zero: bool) -> dict[str, Any]:
    """Ray Tune search space; constants stay plain values (Tune passes them through)."""
    from ray import tune

    def dim(lo: float, hi: float) -> Any:
        return lo if lo == hi else tune.loguniform(lo, hi)

    space: dict[str, Any] = {"student_layers": tune.choice(list(depths)), "lr": dim(*lr_range)}
    for name in WEIGHTS:
        lo, hi = weight_ranges[name]
        space[f"{name}_weight"] = dim(lo, hi)
        if allow_zero and lo < hi:
            space[f"{name}_on"] = tune.choice([True, False])
    return space


def start_point(point: dict[str, Any], depths: Sequence[int], lr_range: tuple[float, float],
                weight_ranges: dict[str, tuple[float, float]], allow_zero: bool) -> dict[str, Any]:
    """A point to evaluate first, given in the distillation's own terms ({"student_layers":
    4, "lr": 1e-3, "cos_weight": 1, "l2_weight": 0.1, "ms_weight": 1}: the paper's
    setting), as the search space's parameters; raises ValueError naming what is outside
    the space."""
    known = {"student_layers", "lr", *(f"{name}_weight" for name in WEIGHTS)}
    if set(point) != known:
        raise ValueError(f"start point {point}: give exactly {sorted(known)}")
    if point["student_layers"] not in depths:
        raise ValueError(f"start point {point}: student_layers must be one of {list(depths)}")
    sample: dict[str, Any] = {"student_layers": point["student_layers"]}
    for key, (lo, hi), may_be_zero in [("lr", lr_range, False),
                                      *((f"{n}_weight", weight_ranges[n], allow_zero) for n in WEIGHTS)]:
        value = float(point[key])
        on_key = key.replace("_weight", "_on")
        if value == 0 and may_be_zero and hi > lo:
            sample.update({key: lo, on_key: False})
            continue
        if not lo <= value <= hi:
            raise ValueError(f"start point {point}: {key} {value:g} is outside the searched range "
                             f"[{lo:g}, {hi:g}]{' (or 0)' if may_be_zero and hi > lo else ''}")
        if lo < hi:
            sample[key] = value
            if may_be_zero:
                sample[on_key] = True
    return sample


def effective_params(sample: dict[str, Any], teacher_layers: int, max_blocks: int) -> dict[str, Any]:
    """The distillation settings a sampled point means: weights switched off are 0, blocks
    follow depth, and ms is 0 without an intermediate block."""
    depth = int(sample["student_layers"])
    blocks = blocks_for(teacher_layers, depth, max_blocks)
    params: dict[str, Any] = {"student_layers": depth, "blocks": blocks, "lr": float(sample["lr"])}
    for name in WEIGHTS:
        on = sample.get(f"{name}_on", True)
        params[f"{name}_weight"] = float(sample[f"{name}_weight"]) if on else 0.0
    if blocks < 2:
        params["ms_weight"] = 0.0
    return params


def trial_cpus_held(num_workers: int, cpus_per_worker: float, trial_cpus: float) -> float:
    """CPUs one trial holds: its Train workers' and its Tune driver's."""
    return num_workers * cpus_per_worker + trial_cpus


def max_concurrent_trials(cluster_cpus: float, cluster_gpus: float, num_workers: int, cpus_per_worker: float,
                          use_gpu: bool, trial_cpus: float, data_cpus: float) -> int:
    """Trials that fit side by side: each holds num_workers x cpus_per_worker (and one GPU
    per worker with use_gpu) plus trial_cpus for its Tune driver; data_cpus stay free for
    Ray Data's read tasks, which every trial's workers need to stream their data. At least 1."""
    per_trial = trial_cpus_held(num_workers, cpus_per_worker, trial_cpus)
    fits = [math.floor((cluster_cpus - data_cpus) / per_trial + 1e-9)] if per_trial > 0 else []
    if use_gpu:
        fits.append(math.floor(cluster_gpus / num_workers))
    return max(1, min(fits)) if fits else 1
