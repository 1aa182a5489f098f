"""The training progress line a worker logs every few steps.

Plain lines rather than a redrawn bar: worker output reaches the driver as log lines. A
line reads, e.g.

    [train] epoch 8/60 step 40/188 (run 1356/11280) ce=5.4561 36.1 samples/s ETA epoch 2.4 min, run 142.4 min

Throughput and the epoch's ETA come from the steps since the previous line, so a
validation pass or a paused process shows up once instead of dragging the rate down for
the rest of the run. The run's ETA uses the mean time per step since this process
started, which includes the per-epoch validation still to come.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("slmrec.train")


class Progress:
    def __init__(self, *, epochs: int, steps_per_epoch: int, first_step: int, every: int, rank: int,
                 records: list[dict[str, float]], clock: Callable[[], float] = time.time):
        """`first_step`: the run-wide step this process starts at (after a resume)."""
        self.epochs, self.steps_per_epoch, self.every, self.rank = epochs, steps_per_epoch, every, rank
        self.total = epochs * steps_per_epoch
        self.first_step = first_step
        self.records = records  # every logged step's loss terms, for the report's curves
        self.clock = clock
        self.start = self.window_start = clock()
        self.window_samples = self.window_steps = 0

    def step(self, epoch: int, step: int, global_step: int, samples: int, terms: dict[str, float]) -> str | None:
        """Count one optimiser step (`epoch` from 0, `step` from 1 within it, `samples` the
        rows it trained on all workers); returns the line when one is due (rank 0 only)."""
        self.window_samples += samples
        self.window_steps += 1
        last = global_step >= self.total
        if self.rank != 0 or (step % self.every and not last):
            return None
        self.records.append({"step": global_step, "epoch": epoch + 1, **terms})
        now = self.clock()
        window = max(now - self.window_start, 1e-9)
        rate = self.window_samples / window
        epoch_left = max(0, self.steps_per_epoch - step) * window / self.window_steps
        run_left = max(0, self.total - global_step) * (now - self.start) / max(global_step - self.first_step, 1)
        self.window_start, self.window_samples, self.window_steps = now, 0, 0
        loss = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
        line = (f"[train] epoch {epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch} "
                f"(run {global_step}/{self.total}) {loss} {rate:.1f} samples/s "
                f"ETA epoch {epoch_left / 60:.1f} min, run {run_left / 60:.1f} min")
        log.info(line)
        return line
