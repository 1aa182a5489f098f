"""Paths given to a job submitted with `ray job submit --working-dir`.

Such a job's driver runs in an unpacked copy of the uploaded working directory (a
session folder on the head node; out/ and runs/ are excluded from the upload), so a
relative --data finds nothing and a relative --output writes into a folder that is
deleted with the session, while workers on other nodes resolve it against their own
copy. Jobs refuse relative data and output paths there, before any work starts; relative
paths to files of the repository itself (--config, --deepspeed-config) are fine.
"""
from __future__ import annotations

import json
import os
from typing import Any

from jobs.common.model_spec import split_model_spec

# Job-config fields that name data or outputs (not repository files).
DATA_PATH_FIELDS = ("input", "data", "output", "teacher", "item_table", "scratch_dir",
                    "storage_path", "model")

# Set by Ray's job supervisor for the driver of a submitted job.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_with_working_dir() -> bool:
    spec = os.environ.get(JOB_CONFIG_ENV)
    return bool(spec) and "working_dir" in (json.loads(spec).get("runtime_env") or {})


def _paths(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    if not isinstance(value, str) or not value:
        return []
    return [split_model_spec(value)[1] or value]  # serve's --model NAME=PATH


def refuse_relative_paths_if_submitted(config: Any, job: str) -> None:
    """Exit with a message naming each relative data/output path of `config` when this
    process is a job submitted with a working directory."""
    if not submitted_with_working_dir():
        return
    relative = [(name, path) for name in DATA_PATH_FIELDS
                for path in _paths(getattr(config, name, None))
                if "://" not in path and not os.path.isabs(path)]
    if relative:
        flags = ", ".join(f"--{name.replace('_', '-')} {path}" for name, path in relative)
        raise SystemExit(f"{job}: {flags}: a job submitted with --working-dir runs in an uploaded "
                         "copy of the repository, so data and output paths must be absolute, on "
                         "storage every node sees")
