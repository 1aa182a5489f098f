"""A `--model` value of the serving jobs: PATH, or NAME=PATH to give the model an id; PATH
is a model directory or the output directory of the job that trained it."""
from __future__ import annotations

import os
from pathlib import Path


def split_model_spec(spec: str) -> tuple[str, str]:
    """(model id, checkpoint path). A path may hold '=' itself (a run folder named
    `lr=1e-3`), so the spec is NAME=PATH only when the part before '=' is a bare name and
    the whole spec is not an existing path; otherwise the id is the path's last part."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or os.sep in name or os.path.exists(spec):
        return Path(spec).name, spec
    return name, path


def resolve_model_dir(path: str | Path) -> Path:
    """A training job's output directory (its model is OUTPUT/best) or a model directory."""
    path = Path(path).resolve()
    return path / "best" if (path / "best" / "meta.json").is_file() else path
