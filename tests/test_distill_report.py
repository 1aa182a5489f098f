"""The distillation report's check that the teacher's test rows, read from its own run,
were measured as the student's were."""
from __future__ import annotations

from jobs.common.distill_report import teacher_setup_differences


def _metrics(**spec):
    return {"spec": {"seed": 0, "sampled_negatives": 999, "train_on_valid": False, **spec}}


def test_like_with_like_has_no_differences():
    assert teacher_setup_differences(_metrics(), 50, _metrics(), 50) == []
    assert teacher_setup_differences(None, 50, _metrics(), 200) == []  # no teacher row at all


def test_every_setting_that_changes_the_test_numbers_is_named():
    teacher = _metrics(seed=1, sampled_negatives=99, train_on_valid=True)
    assert teacher_setup_differences(teacher, 200, _metrics(), 50) == [
        "sequence length: teacher 200, student 50",
        "seed (the sampled protocol's negatives): teacher 1, student 0",
        "sampled negatives: teacher 99, student 999",
        "validation targets trained on: teacher True, student False",
    ]
