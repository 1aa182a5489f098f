"""A job submitted with `ray job submit --working-dir` refuses relative data and output
paths (they would resolve inside the uploaded copy of the repository); run directly, or
submitted without a working directory, it accepts them."""
from __future__ import annotations

import json

import pytest

from tests.job_flags import parse_job_flags

SUBMITTED = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}})


@pytest.mark.parametrize("job,argv,named", [
    ("distill", ["--data", "out/ml-1m", "--output", "/abs/student", "--teacher", "runs/t"],
     "--data out/ml-1m, --teacher runs/t"),
    ("prepare", ["--input", "/abs/logs", "--output", "out/prep"], "--output out/prep"),
    ("serve", ["--model", "a=runs/s/best", "--data", "/abs/d"], "--model runs/s/best"),
    ("tune", ["--data", "/d", "--teacher", "/t", "--output", "/o", "--storage-path", "ray"],
     "--storage-path ray"),
])
def test_submitted_jobs_refuse_relative_data_and_output_paths(monkeypatch, job, argv, named):
    from jobs import distill, prepare, serve, tune  # noqa: F401 (modules the parametrize names)
    from jobs.common.job_paths import JOB_CONFIG_ENV, refuse_relative_paths_if_submitted

    config = parse_job_flags(job, argv)
    refuse_relative_paths_if_submitted(config, job)  # a direct run: fine
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    refuse_relative_paths_if_submitted(config, job)  # submitted without a working dir: fine
    monkeypatch.setenv(JOB_CONFIG_ENV, SUBMITTED)
    with pytest.raises(SystemExit, match=rf"^{job}: {named}: a job submitted with --working-dir"):
        refuse_relative_paths_if_submitted(config, job)


def test_absolute_paths_uris_and_repository_files_pass(monkeypatch):
    from jobs.common.job_paths import JOB_CONFIG_ENV, refuse_relative_paths_if_submitted

    monkeypatch.setenv(JOB_CONFIG_ENV, SUBMITTED)
    config = parse_job_flags("distill", ["--data", "/mnt/shared/d", "--output", "/mnt/shared/o",
                                         "--storage-path", "s3://bucket/ray",
                                         "--deepspeed-config", "cluster/deepspeed/zero2.json"])
    refuse_relative_paths_if_submitted(config, "distill")
    # score's --model is a path; '=' in a folder name does not make it NAME=PATH.
    config = parse_job_flags("score", ["--model", "/runs/lr=1e-3/best", "--data", "/d", "--output", "/o"])
    refuse_relative_paths_if_submitted(config, "score")


def test_every_job_checks_its_paths_when_submitted(monkeypatch):
    # The check sits at each job's command-line entry, right after parsing.
    import importlib
    from pathlib import Path

    jobs = sorted(p.stem for p in (Path(__file__).parents[1] / "jobs").glob("[!_]*.py"))
    assert len(jobs) == 9
    for job in jobs:
        source = importlib.import_module(f"jobs.{job}").main.__code__.co_names
        assert "refuse_relative_paths_if_submitted" in source, job
