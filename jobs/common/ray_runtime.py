"""Connect to Ray the same way in every job.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster; otherwise it
starts a local instance bounded to `num_cpus`, its dashboard on loopback only.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# Jobs run as scripts (`python jobs/x.py`, also under `ray job submit --working-dir .`):
# the repository root must be importable for `slmrec`, `pipelines` and `jobs.common`.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Ray reads these at init; workers inherit them. Loopback only, fast Train V2 start-up,
# DeepSpeed on the CPU accelerator unless a GPU is present.
DEFAULT_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# True once init_local_ray started a local instance in this process: one that no
# autoscaler will ever add a node (or a GPU) to.
_started_here = False


def set_default_env() -> None:
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


def check_cpus_left_for_reads(reserved: float, reserving: str, advice: str) -> None:
    """Refuse a job whose long-lived workers or actors (`reserving`, holding `reserved`
    CPUs) fit the cluster but leave it less than one CPU: Ray Data's read tasks never get
    one, the data never streams, and the job waits forever without an error. A cluster too
    small for them altogether is left to the autoscaler."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if reserved <= total < reserved + 1:
        raise ValueError(f"{reserving} reserve {reserved:g} of the cluster's {total:g} CPUs, leaving none for "
                         f"Ray Data to read the data; {advice}")


def check_gpus(needed: float, asking: str) -> None:
    """Ray keeps an actor or Train worker that asks for GPUs the cluster lacks pending,
    without an error. A local instance never gains one, so the job is refused there; a
    cluster may (its autoscaler adds GPU nodes on demand), so the wait is announced."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if needed <= have:
        return
    if _started_here:
        raise ValueError(f"{asking} asks for {needed:g} GPU(s), and this machine's local Ray has {have:g}; "
                         "run without GPUs or submit the job to a cluster that has them")
    print(f"[ray] note: {asking} asks for {needed:g} GPU(s) and the cluster has {have:g} now; the job waits "
          "until the autoscaler adds them (stop it and run without GPUs on a cluster that cannot)", flush=True)


def init_local_ray(num_cpus: int | None = 2) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a bounded local one. A no-op when
    Ray is already initialised in this process (tests share one instance)."""
    set_default_env()
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's own runtime_env (working_dir, env_vars) applies;
        # passing another here would override it.
        ray.init()
        return
    # Ray Train V2's PlacementGroupCleaner asks the State API whether the run's controller is
    # alive, and without RAY_ADDRESS that API resolves the most recently started Ray instance
    # on the machine: with a second local instance (another job, or tests next to a job) it
    # found no such controller and removed a healthy run's placement group, killing its
    # workers. So the GCS port is fixed before start and the workers get their own cluster's
    # address; the dashboard (loopback only) serves the State API the cleaner needs.
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # Workers import slmrec/pipelines/jobs from the repository root.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {**DEFAULT_ENV, "PYTHONPATH": _pythonpath(),
                                           "RAY_ADDRESS": address}})
    finally:
        # Read once at start; a Ray started later by a child process must pick its own port.
        del os.environ["RAY_GCS_SERVER_PORT"]
    started = ray.get_runtime_context().gcs_address
    if started != address:
        ray.shutdown()
        raise RuntimeError(f"local Ray started at {started}, not at the reserved {address}")
    global _started_here
    _started_here = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH", "")
    return str(ROOT) + (os.pathsep + existing if existing else "")
