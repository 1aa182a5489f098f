"""A run that picks its best epoch (or a sweep that ranks trials) on the validation
targets must not build on a model trained on them (`--train-on-valid`): through the frozen
item table, or through the teacher a student is distilled from, the targets would leak
into that choice."""
from __future__ import annotations

import json
from pathlib import Path


def trained_on_valid(upstream: str | Path) -> bool:
    """Whether the stage output holding `upstream` (its directory, or a model folder inside
    it) trained on the validation targets; False when it has no metrics.json to say so."""
    path = Path(upstream)
    for directory in (path, path.parent):
        metrics = directory / "metrics.json"
        if metrics.is_file():
            return bool(json.loads(metrics.read_text()).get("spec", {}).get("train_on_valid"))
    return False


def refuse_validation_leak(upstream: str | Path, flag: str, validated: bool) -> None:
    """Exit naming `flag` when this run is `validated` on targets `upstream` trained on."""
    if validated and trained_on_valid(upstream):
        raise SystemExit(f"{flag} {upstream} was trained on the validation targets (--train-on-valid), "
                         "and this run chooses by them, so the choice would see what it learned; "
                         "pass --train-on-valid here too, or use one trained without it")
