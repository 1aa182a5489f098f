"""Pick the student a sweep hands over to serving: pure functions, no Ray.

The rule (jobs/tune.py --max-latency-ms, --tolerance):
1. Eligible: trials that did not fail, with a saved student checkpoint and a finite
   validation NDCG@10 (the best over its epochs: the epoch whose weights the checkpoint
   holds). Trials stopped early by ASHA are eligible: their checkpoint is a real,
   evaluated model. A trial that raised is not, even with a checkpoint from before its
   error: whatever broke it (a diverging loss, a bad setting, a lost worker that Tune
   gave up on) is not ruled out for the weights it saved, and it has no test metrics.
2. Feasible: eligible trials whose measured latency is <= max_latency_ms (no bound
   when max_latency_ms is None).
3. Best = the highest validation NDCG@10 among feasible trials. Every feasible trial
   within `tolerance` of it (absolute NDCG units: quality >= best - tolerance) is a
   candidate; tolerance 0 keeps only the best.
4. Winner = the shallowest candidate; ties broken by higher NDCG@10, then lower latency,
   then the smaller trial id, so the choice never depends on the order of the trials.
A shallower student is preferred within the tolerance because depth is what the
distillation buys: fewer layers serve faster on any hardware, while the measured
latency also carries the noise of the machine it was timed on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

# Sums of per-user metrics differ in the last bits between equal models; a candidate
# exactly `tolerance` below the best must not be dropped by rounding.
_SLACK = 1e-12


@dataclass(frozen=True)
class Candidate:
    trial_id: str
    depth: int
    quality: float  # best validation NDCG@10 of the trial
    latency_ms: float  # serving latency at the sweep's fixed batch size
    checkpoint: Optional[str]  # the trial's student directory (OUTPUT/best), None if not saved
    failed: bool = False  # the trial ended with an error


class NoFeasibleTrial(ValueError):
    """No trial satisfies the constraints; the message says which bound to relax."""


def eligible(candidates: Iterable[Candidate]) -> list[Candidate]:
    return [c for c in candidates
            if not c.failed and c.checkpoint and math.isfinite(c.quality) and math.isfinite(c.latency_ms)]


def pareto_front(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Eligible trials no other trial beats on both axes (at most as slow and at least as
    good, strictly better on one), sorted by latency."""
    pool = eligible(candidates)
    front = [c for c in pool
             if not any(o.latency_ms <= c.latency_ms and o.quality >= c.quality
                        and (o.latency_ms < c.latency_ms or o.quality > c.quality) for o in pool)]
    return sorted(front, key=lambda c: (c.latency_ms, -c.quality, c.trial_id))


def choose_winner(candidates: Iterable[Candidate], max_latency_ms: Optional[float] = None,
                  tolerance: float = 0.0) -> Candidate:
    """The winner under the module's rule; raises NoFeasibleTrial naming the problem."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    candidates = list(candidates)
    pool = eligible(candidates)
    if not pool:
        raise NoFeasibleTrial(f"none of the {len(candidates)} trial(s) ended without an error and with "
                              "a student checkpoint, a finite validation NDCG@10 and a latency; see the trials "
                              "table for their status")
    feasible = [c for c in pool if max_latency_ms is None or c.latency_ms <= max_latency_ms]
    if not feasible:
        fastest = min(pool, key=lambda c: (c.latency_ms, c.trial_id))
        raise NoFeasibleTrial(f"no trial meets --max-latency-ms {max_latency_ms:g}: the fastest, trial "
                              f"{fastest.trial_id} ({fastest.depth} layers), took {fastest.latency_ms:.3f} ms; "
                              "raise the bound or search shallower students")
    best = max(c.quality for c in feasible)
    near = [c for c in feasible if c.quality >= best - tolerance - _SLACK]
    return min(near, key=lambda c: (c.depth, -c.quality, c.latency_ms, c.trial_id))


def describe_rule(max_latency_ms: Optional[float], tolerance: float) -> str:
    bound = f"latency <= {max_latency_ms:g} ms" if max_latency_ms is not None else "no latency bound"
    pick = (f"the shallowest student whose validation NDCG@10 is within {tolerance:g} of the best" if tolerance
            else "the best validation NDCG@10, the shallowest student on a tie")
    return (f"among trials with a checkpoint and {bound}: {pick} (further ties: higher NDCG@10, lower "
            "latency, smaller trial id)")
