"""Learning-rate schedule: warm-up + cosine factors and the silent replay on resume."""
from __future__ import annotations

import warnings

import pytest
import torch

from slmrec.schedule import resume_at, warmup_cosine, warmup_cosine_factor


def test_warmup_cosine():
    assert warmup_cosine_factor(0, 4, 12) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine_factor(8, 4, 12) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine_factor(12, 4, 12) == pytest.approx(0.0)


def _sgd_with_schedule(lr: float = 0.5):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return optimizer, warmup_cosine(optimizer, 4, 12)


def test_resume_at_matches_stepping_and_stays_silent():
    stepped_opt, stepped = _sgd_with_schedule()
    for _ in range(7):
        stepped_opt.step()
        stepped.step()
    resumed_opt, resumed = _sgd_with_schedule()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the order warning torch gives a bare replay would fail here
        resume_at(resumed, 7)
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(stepped_opt.param_groups[0]["lr"])
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.5 * warmup_cosine_factor(7, 4, 12))
    resumed_opt.step()
    resumed.step()
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.5 * warmup_cosine_factor(8, 4, 12))
    with pytest.raises(ValueError, match="step must be >= 0"):
        resume_at(resumed, -1)


def test_bare_replay_warns_so_resume_at_is_needed():
    _, scheduler = _sgd_with_schedule()
    with pytest.warns(UserWarning, match="lr_scheduler.step"):
        scheduler.step()
