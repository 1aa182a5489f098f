"""The sweep's winner rule and Pareto front (jobs/common/winner.py), on hand-made trials."""
from __future__ import annotations

import math

import pytest

from jobs.common.winner import Candidate, NoFeasibleTrial, choose_winner, pareto_front


def cand(trial_id: str, depth: int, quality: float, latency: float, checkpoint: str | None = "ckpt") -> Candidate:
    return Candidate(trial_id, depth, quality, latency, checkpoint and f"/runs/{trial_id}/best")


TRIALS = [cand("a", 1, 0.10, 1.0), cand("b", 2, 0.15, 2.0), cand("c", 4, 0.16, 4.0), cand("d", 6, 0.14, 6.0)]


def test_best_quality_without_bounds():
    assert choose_winner(TRIALS).trial_id == "c"


def test_latency_bound_excludes_slow_trials():
    assert choose_winner(TRIALS, max_latency_ms=3.0).trial_id == "b"
    # The bound is inclusive.
    assert choose_winner(TRIALS, max_latency_ms=4.0).trial_id == "c"


def test_tolerance_prefers_the_shallowest_near_the_best():
    # best 0.16: within 0.01 are b (0.15) and c; b is shallower.
    assert choose_winner(TRIALS, tolerance=0.01).trial_id == "b"
    assert choose_winner(TRIALS, tolerance=0.0099).trial_id == "c"
    assert choose_winner(TRIALS, tolerance=0.06).trial_id == "a"


def test_ties_on_depth_go_to_quality_then_latency_then_id():
    tied = [cand("z", 2, 0.20, 3.0), cand("y", 2, 0.20, 2.0), cand("x", 2, 0.20, 2.0), cand("w", 2, 0.19, 1.0)]
    assert choose_winner(tied).trial_id == "x"
    assert choose_winner(list(reversed(tied))).trial_id == "x"
    # Within tolerance the depth tie falls to quality before latency.
    assert choose_winner(tied, tolerance=0.05).trial_id == "x"


def test_trials_without_checkpoint_or_finite_quality_are_ignored():
    trials = [cand("nan", 1, math.nan, 1.0), cand("nockpt", 1, 0.9, 1.0, checkpoint=None), cand("ok", 3, 0.2, 3.0)]
    assert choose_winner(trials).trial_id == "ok"


def test_failed_trials_neither_win_nor_enter_the_front():
    # The best validation score and a checkpoint from before the error are not enough.
    failed = Candidate("boom", 1, 0.9, 0.5, "/runs/boom/best", failed=True)
    assert choose_winner(TRIALS + [failed]).trial_id == "c"
    assert "boom" not in {c.trial_id for c in pareto_front(TRIALS + [failed])}
    with pytest.raises(NoFeasibleTrial, match="ended without an error"):
        choose_winner([failed])


def test_empty_feasible_set_names_the_fastest_trial():
    with pytest.raises(NoFeasibleTrial, match=r"--max-latency-ms 0\.5: the fastest, trial a \(1 layers\), took 1\.000 ms"):
        choose_winner(TRIALS, max_latency_ms=0.5)


def test_no_eligible_trial_is_a_clear_error():
    with pytest.raises(NoFeasibleTrial, match="none of the 2 trial"):
        choose_winner([cand("a", 1, math.nan, 1.0), cand("b", 1, 0.1, 1.0, checkpoint=None)])
    with pytest.raises(NoFeasibleTrial, match="none of the 0 trial"):
        choose_winner([])


def test_negative_tolerance_is_rejected():
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        choose_winner(TRIALS, tolerance=-0.1)


def test_pareto_front_keeps_only_undominated_trials_by_latency():
    # d is slower and worse than c; e ties c on quality but is slower; f ties b exactly.
    trials = TRIALS + [cand("e", 4, 0.16, 5.0), cand("f", 2, 0.15, 2.0)]
    assert [c.trial_id for c in pareto_front(trials)] == ["a", "b", "f", "c"]
