"""`ray job submit` for real: a Ray head started with `ray start --head` (127.0.0.1, bounded
CPUs, its own temp dir and free ports; cluster/local_cluster.py), jobs/distill.py submitted
to it on tiny data, SUCCEEDED awaited, its outputs checked, and the cluster stopped, every
process it started gone. The two-node variant (cluster/local_two_node.sh: one Ray Train
worker per node) is slow-marked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster.local_cluster import is_alive, process_tree, start
from tests.cluster_inputs import TINY_DISTILL_FLAGS, write_inputs

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def submit(address: str, entrypoint: list[str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit` from the repository root with the cluster runtime env; waits for the end."""
    return subprocess.run([RAY, "job", "submit", "--address", address, "--runtime-env", "cluster/runtime_env.yaml",
                           "--working-dir", ".", "--", *entrypoint],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def test_ray_job_submit_runs_distill_on_a_ray_start_head(tmp_path):
    prep, teacher = write_inputs(tmp_path)
    out = tmp_path / "student"
    # Unix socket paths under the temp dir must stay short: not under pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="rh", dir="/tmp") as workdir:
        cluster = start(workdir, cpus=[2])
        try:
            processes = [p for node in cluster.nodes for p in process_tree(node.pid, node.start_time)]
            result = submit(cluster.dashboard_url, [
                "python", "jobs/distill.py", "--data", str(prep), "--teacher", str(teacher), "--output", str(out),
                "--epochs", "1", "--cpus-per-worker", "0.5", *TINY_DISTILL_FLAGS])
            # A relative output would land in the uploaded copy of the repository on the head.
            relative = submit(cluster.dashboard_url, [
                "python", "jobs/distill.py", "--data", str(prep), "--teacher", str(teacher),
                "--output", "runs/submitted-student"])
            from ray.job_submission import JobStatus, JobSubmissionClient

            jobs = JobSubmissionClient(cluster.dashboard_url).list_jobs()
        finally:
            cluster.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    statuses = {j.entrypoint.split("--output ")[1].split()[0]: j.status for j in jobs}
    assert statuses == {str(out): JobStatus.SUCCEEDED, "runs/submitted-student": JobStatus.FAILED}
    assert relative.returncode != 0
    assert ("distill: --output runs/submitted-student: a job submitted with --working-dir runs in an "
            "uploaded copy") in relative.stdout + relative.stderr
    assert "[distill] student ->" in result.stdout
    for name in ("best/meta.json", "best/model.safetensors", "metrics.json", "REPORT.md", "report.json"):
        assert (out / name).stat().st_size > 0, name
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert 0 <= final["test_full/NDCG@10"] <= 1 and final["best_epoch"] == 1
    # Stopping left none of the processes the cluster had started (raylet, GCS, workers, driver).
    assert processes and not [pid for pid, t in processes if is_alive(pid, t)]


@pytest.mark.slow
def test_two_node_script_places_one_train_worker_per_node(tmp_path):
    workdir = tempfile.mkdtemp(prefix="tn", dir="/tmp")
    result = subprocess.run(["bash", "cluster/local_two_node.sh", workdir], cwd=ROOT, capture_output=True, text=True,
                            timeout=1500, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "OK: job SUCCEEDED, 2 Ray Train workers on 2 nodes" in result.stdout
    state = json.loads((Path(workdir) / "cluster.json").read_text())
    assert not [n["pid"] for n in state["nodes"] if is_alive(n["pid"], n["start_time"])]
