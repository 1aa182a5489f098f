"""Faults injected into real jobs on a real Ray cluster (`ray start --head`, with the
dashboard, so the state API reports the PIDs to kill): a Ray Train worker killed in the
middle of a distillation, prepare tasks' workers killed and a prepare interrupted, a
Serve replica killed. Every kill is SIGKILL of a PID that the state API names and that
is checked to belong to the cluster this module started.

The cluster is one head with 4 logical CPUs (cluster/local_cluster.py); jobs are
submitted with the Jobs API and the repository as working_dir, as `ray job submit` does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster.local_cluster import LocalCluster, process_tree, free_ports, start
from tests.cluster_inputs import TINY_DISTILL_FLAGS, write_inputs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    workdir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Unix socket paths live below
    c = start(workdir, cpus=[4])
    yield c
    c.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def submit(client, args: list[str]) -> str:
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    return client.submit_job(entrypoint=" ".join(["python", *args]),
                             runtime_env={**runtime_env, "working_dir": str(ROOT)})


def wait_for(client, submission_id: str, timeout_s: float = 900):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(submission_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(1)
    raise TimeoutError(f"job {submission_id} still {status} after {timeout_s}s")


def cluster_pids(cluster: LocalCluster) -> set[int]:
    return {pid for n in cluster.nodes for pid, _ in process_tree(n.pid, n.start_time)}


def kill(cluster: LocalCluster, pid: int) -> None:
    """SIGKILL a process of this module's cluster (never anything else)."""
    assert pid in cluster_pids(cluster), f"PID {pid} is not a process of the test cluster"
    os.kill(pid, signal.SIGKILL)


def ray_job_id(client, submission_id: str, timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job_id = client.get_job_info(submission_id).job_id
        if job_id:
            return job_id
        time.sleep(0.5)
    raise TimeoutError(f"job {submission_id} has no driver after {timeout_s}s")


# ---- training ----------------------------------------------------------------------------

def _alive_train_workers(cluster: LocalCluster, job_id: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=cluster.dashboard_url, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", job_id)])


def _committed_checkpoint(output: Path) -> dict | None:
    """The latest checkpoint Ray Train has registered for the run writing to `output`."""
    for snapshot in (output / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except ValueError:  # being rewritten
            return None
    return None


def test_killed_train_worker_resumes_and_matches_an_uninterrupted_run(cluster, client, inputs, tmp_path):
    prep, teacher = inputs
    # 2 workers, batch 8: ~4 steps per worker and epoch; a checkpoint every 2 steps.
    common = ["jobs/distill.py", "--data", str(prep), "--teacher", str(teacher), "--epochs", "3",
              "--num-workers", "2", "--cpus-per-worker", "0.5", *TINY_DISTILL_FLAGS, "--batch-size", "8",
              "--checkpoint-every-steps", "2", "--max-failures", "1"]
    reference = submit(client, [*common, "--output", str(tmp_path / "reference")])
    faulty = submit(client, [*common, "--output", str(tmp_path / "faulty")])

    job_id = ray_job_id(client, faulty)
    deadline = time.time() + 600
    pids: list[int] = []
    # Kill one worker right after the first checkpoint is committed (mid-epoch 1). A
    # checkpoint directory on storage is not enough: the controller registers a report
    # only when it has polled every rank's, and a rank killed before that loses it.
    while time.time() < deadline and not _committed_checkpoint(tmp_path / "faulty"):
        pids = [a.pid for a in _alive_train_workers(cluster, job_id)] or pids
        time.sleep(0.2)
    assert len(pids) == 2, "two Ray Train workers were reported alive"
    kill(cluster, pids[1])
    killed_at = time.time()

    from ray.job_submission import JobStatus

    assert wait_for(client, faulty) == JobStatus.SUCCEEDED, client.get_job_logs(faulty)[-4000:]
    assert wait_for(client, reference) == JobStatus.SUCCEEDED, client.get_job_logs(reference)[-4000:]
    logs = client.get_job_logs(faulty)
    assert "[train] resumed at epoch 0 step" in logs, logs[-4000:]  # from a mid-epoch checkpoint
    new_pids = {a.pid for a in _alive_train_workers(cluster, job_id)}
    assert not new_pids & set(pids), "the worker group was restarted (new processes)"

    ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    got = json.loads((tmp_path / "faulty" / "metrics.json").read_text())
    # The training split is deterministic, so the resumed run trained on the same rows: the
    # same numbers, to float summation order.
    for key, value in ref["final"].items():
        assert got["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for h_ref, h_got in zip(ref["history"], got["history"], strict=True):
        for key, value in h_ref.items():
            if key != "epoch_seconds":
                assert h_got[key] == pytest.approx(value, rel=1e-6), (h_ref["epoch"], key)
    _record("training", {
        "killed_pid": pids[1], "recovered_and_finished_after_s": round(time.time() - killed_at, 1),
        "resumed_from": logs[logs.index("[train] resumed at"):].splitlines()[0],
        "final_reference": ref["final"], "final_after_kill": got["final"],
        "identical": ref["final"] == got["final"],
        "history_identical": [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in ref["history"]]
        == [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in got["history"]]})


def _record(name: str, result: dict) -> None:
    """Keep the measured figures next to the test output for the README."""
    path = Path(tempfile.gettempdir()) / "slmrec_resilience.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = result
    path.write_text(json.dumps(data, indent=2, default=str))


# ---- data --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A synthetic log of 4 files: 4 read units, so 4 scatter (write) tasks."""
    from pipelines.synthetic import SyntheticSpec, write_synthetic

    directory = tmp_path_factory.mktemp("logs")
    write_synthetic(SyntheticSpec(rows=120_000, items=2_000, seed=3, rows_per_shard=30_000), directory)
    return directory


def _prepare_args(logs: Path, out: Path) -> list[str]:
    # Small read batches and 4 partitions: tasks long enough for the state API to see running.
    return ["jobs/prepare.py", "--input", str(logs), "--output", str(out), "--read-batch-rows", "1000",
            "--num-partitions", "4", "--task-memory-mb", "256"]


def _prepared_contents(out: Path) -> dict:
    """Everything the stage wrote, in a comparable form (timings and paths excepted)."""
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("seconds")
    stats.pop("config")
    sequences = pq.read_table(out / "sequences").sort_by("user_id").to_pylist()
    items = pq.read_table(out / "items").to_pylist()
    return {"stats": stats, "sequences": sequences, "items": items}


def _running_tasks(cluster: LocalCluster, job_id: str, names: set[str]) -> list:
    from ray.util.state import list_tasks

    return [t for t in list_tasks(address=cluster.dashboard_url, filters=[("state", "=", "RUNNING"),
                                                                          ("job_id", "=", job_id)])
            if t.worker_pid and any(n in t.name for n in names)]


def _run_and_kill_task(cluster, client, args: list[str], names: set[str]) -> tuple[str, list[str]]:
    """Submit prepare and SIGKILL the worker of the first running task named like `names`."""
    sid = submit(client, args)
    job_id = ray_job_id(client, sid)
    deadline = time.time() + 600
    while time.time() < deadline:
        tasks = _running_tasks(cluster, job_id, names)
        if tasks:
            kill(cluster, tasks[0].worker_pid)
            return sid, [tasks[0].name]
        if client.get_job_status(sid).is_terminal():
            break
        time.sleep(0.2)
    pytest.fail(f"no running task named {names} was seen")


@pytest.fixture(scope="module")
def reference_prepared(cluster, client, logs, tmp_path_factory) -> dict:
    from ray.job_submission import JobStatus

    out = tmp_path_factory.mktemp("reference") / "prep"
    sid = submit(client, _prepare_args(logs, out))
    assert wait_for(client, sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)[-3000:]
    return _prepared_contents(out)


def test_prepare_task_killed_once_is_retried_and_output_is_identical(cluster, client, logs, reference_prepared,
                                                                     tmp_path):
    """The scatter (Ray Data write) tasks run for seconds here; the per-partition DuckDB
    tasks (dedup, k-core counts, sequences) finish in well under the state API's ~1 s
    reporting delay on this data, so they are not caught running."""
    from ray.job_submission import JobStatus

    names = {"Write"}
    sid, killed = _run_and_kill_task(cluster, client, _prepare_args(logs, tmp_path / "faulty"), names)
    status = wait_for(client, sid)
    log = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, log[-3000:]
    assert "will be retried" in log, log[-3000:]  # the raylet saw the worker die and resubmitted the task
    assert _prepared_contents(tmp_path / "faulty") == reference_prepared
    _record("prepare-kill-write-task", {"killed": killed, "status": str(status), "output_identical": True})


def test_interrupted_prepare_leaves_no_output_and_a_rerun_is_idempotent(cluster, client, logs, reference_prepared,
                                                                       tmp_path):
    from ray.job_submission import JobStatus

    out = tmp_path / "prep"
    sid = submit(client, _prepare_args(logs, out))
    job_id = ray_job_id(client, sid)
    deadline = time.time() + 600
    while not _running_tasks(cluster, job_id, {"dedup", "item_counts", "sequences", "Write"}):
        assert time.time() < deadline and not client.get_job_status(sid).is_terminal()
        time.sleep(0.2)
    client.stop_job(sid)  # SIGTERM to the driver, then SIGKILL
    assert wait_for(client, sid) == JobStatus.STOPPED
    assert not out.exists(), "an interrupted prepare left (partial) output behind"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}."))

    first = submit(client, _prepare_args(logs, out))
    assert wait_for(client, first) == JobStatus.SUCCEEDED, client.get_job_logs(first)[-3000:]
    assert _prepared_contents(out) == reference_prepared
    again = submit(client, [*_prepare_args(logs, out), "--overwrite"])
    assert wait_for(client, again) == JobStatus.SUCCEEDED, client.get_job_logs(again)[-3000:]
    assert _prepared_contents(out) == reference_prepared
    _record("prepare-interrupt", {"output_after_interrupt": False, "temporary_leftovers": leftovers,
                                  "rerun_identical": True})


# ---- serving -----------------------------------------------------------------------------

def _replicas(cluster: LocalCluster) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
            if a.class_name.startswith("ServeReplica:slmrec")]


def test_killed_serve_replica_is_replaced_and_requests_succeed_again(cluster, client, inputs):
    import httpx

    prep, teacher = inputs
    (port,) = free_ports(1)
    sid = submit(client, ["jobs/serve.py", "--model", f"teacher={teacher / 'best'}", "--data", str(prep),
                          "--port", str(port), "--num-replicas", "1", "--cpus-per-replica", "0.5"])
    url = f"http://127.0.0.1:{port}"
    body = {"requests": [{"user_id": "u1"}, {"user_id": "u2"}], "k": 5}

    def recommend() -> int:
        try:
            return httpx.post(f"{url}/recommend", json=body, timeout=10).status_code
        except httpx.HTTPError:
            return 0  # refused / reset / timed out

    deadline = time.time() + 600
    while recommend() != 200:
        assert time.time() < deadline and not client.get_job_status(sid).is_terminal(), client.get_job_logs(sid)[-3000:]
        time.sleep(1)
    expected = httpx.post(f"{url}/recommend", json=body, timeout=10).json()
    (replica,) = _replicas(cluster)
    kill(cluster, replica.pid)
    killed_at = time.time()
    codes = []
    while True:
        codes.append(recommend())
        if codes[-1] == 200 or time.time() - killed_at > 300:
            break
        time.sleep(0.5)
    recovered_s = time.time() - killed_at
    assert codes[-1] == 200, codes
    (new_replica,) = _replicas(cluster)
    assert new_replica.pid != replica.pid and new_replica.actor_id != replica.actor_id
    assert httpx.post(f"{url}/recommend", json=body, timeout=10).json() == expected
    client.stop_job(sid)
    _record("serve", {"killed_pid": replica.pid, "replacement_pid": new_replica.pid,
                      "recovered_after_s": round(recovered_s, 1),
                      "requests_during_outage": len(codes) - 1,
                      "failed_during_outage": sum(c != 200 for c in codes),
                      "status_codes": sorted(set(codes))})
