"""The worker's progress line: step counts in one unit, windowed throughput, both ETAs."""
from __future__ import annotations

from jobs.common.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_line_counts_steps_per_epoch_and_per_run():
    clock, records = FakeClock(), []
    progress = Progress(epochs=3, steps_per_epoch=10, first_step=0, every=5, rank=0, records=records, clock=clock)
    lines = []
    for step in range(1, 11):
        clock.now += 2.0  # 2 s a step of 32 rows
        lines.append(progress.step(0, step, step, 32, {"ce": 1.5}))
    assert [line is not None for line in lines] == [False] * 4 + [True] + [False] * 4 + [True]
    # 5 steps of 32 rows in 10 s; 5 steps left in the epoch, 25 in the run, 2 s each.
    assert lines[4] == ("[train] epoch 1/3 step 5/10 (run 5/30) ce=1.5000 16.0 samples/s "
                        "ETA epoch 0.2 min, run 0.8 min")
    assert records == [{"step": 5, "epoch": 1, "ce": 1.5}, {"step": 10, "epoch": 1, "ce": 1.5}]


def test_a_pause_shows_in_one_window_only_and_resume_counts_from_its_first_step():
    clock = FakeClock()
    # Resumed at run step 20 of 30 (epoch 3).
    progress = Progress(epochs=3, steps_per_epoch=10, first_step=20, every=2, rank=0, records=[], clock=clock)
    clock.now += 2.0
    progress.step(2, 1, 21, 10, {})
    clock.now += 98.0  # a pause (or a validation pass) inside this window
    slow = progress.step(2, 2, 22, 10, {})
    assert "0.2 samples/s" in slow  # 20 rows in 100 s
    assert "run 22/30" in slow and "run 6.7 min" in slow  # 8 steps left at the run's mean 50 s a step
    for step in (3, 4):
        clock.now += 1.0
        fast = progress.step(2, step, 20 + step, 10, {})
    assert "10.0 samples/s" in fast  # the next window is back at the working rate
    assert "ETA epoch 0.1 min" in fast  # 6 steps left at 1 s each


def test_last_step_always_logged_and_other_ranks_silent():
    clock = FakeClock()
    progress = Progress(epochs=1, steps_per_epoch=3, first_step=0, every=20, rank=0, records=[], clock=clock)
    assert progress.step(0, 1, 1, 4, {}) is None
    assert progress.step(0, 3, 3, 4, {}).startswith("[train] epoch 1/1 step 3/3 (run 3/3)")
    other = Progress(epochs=1, steps_per_epoch=3, first_step=0, every=1, rank=1, records=[], clock=clock)
    assert other.step(0, 1, 1, 4, {}) is None
