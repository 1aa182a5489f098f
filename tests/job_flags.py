"""Parse a job's command line exactly as the job would, without running it: each job's
`main` is called with its `parse_config` replaced by one that stops right after parsing."""
from __future__ import annotations

import importlib


class _Parsed(Exception):
    def __init__(self, config):
        self.config = config


def parse_job_flags(job: str, argv: list[str]):
    """Parse `argv` exactly as `python jobs/JOB.py argv` would, without running the job."""
    module = importlib.import_module(f"jobs.{job}")
    real = module.parse_config

    def parse_only(cls, description, args=None, *rest, **kw):
        raise _Parsed(real(cls, description, args, *rest, **kw))

    module.parse_config = parse_only
    try:
        module.main(argv)
    except _Parsed as parsed:
        return parsed.config
    finally:
        module.parse_config = real
    raise AssertionError(f"jobs/{job}.py main() never called parse_config")
