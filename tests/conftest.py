"""Shared fixtures: one local Ray instance for the whole test session.

Ray is started lazily by the first test that asks for `ray_session`, bounded to two CPUs
and bound to 127.0.0.1, and shut down when the session ends (only the instance this
process started; nothing is killed by name).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep Ray on loopback and make Train V2 start fast; must be set before ray.init.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from jobs.common.ray_runtime import init_local_ray

    init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """A tiny prepared dataset shared (read-only) by the training-stage tests."""
    from tests.prepared_data import write_prepared

    return write_prepared(tmp_path_factory.mktemp("prepared") / "tiny")
