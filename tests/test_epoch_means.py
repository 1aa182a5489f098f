"""An epoch's logged loss terms are means over every worker's micro-batches: two gloo
processes with different sums and counts agree on the pooled means, also across a
mid-epoch checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
rank = int(sys.argv[3])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK=str(rank), WORLD_SIZE="2")
torch.distributed.init_process_group("gloo")
from jobs.common.train_worker import carried_sums, epoch_means, summed_over_workers
cpu = torch.device("cpu")
sums = [{"ce": 6.0, "cos": 1.0}, {"ce": 2.0, "cos": 3.0}][rank]
means = epoch_means(sums, [2, 6][rank], cpu)
# The same epoch checkpointed after each rank's first part, then resumed: the checkpoint
# (written by rank 0) holds the sums of both ranks.
first = [{"ce": 4.0, "cos": 0.5}, {"ce": 1.5, "cos": 2.0}][rank]
saved = summed_over_workers(first, cpu)
resumed = carried_sums(saved, rank)
for k in resumed:
    resumed[k] += sums[k] - first[k]
again = epoch_means(resumed, [2, 6][rank], cpu)
print("RESULT", means["ce"], means["cos"], again["ce"], again["cos"])
"""


def test_epoch_means_pool_every_workers_batches():
    from cluster.local_cluster import free_ports

    port = str(free_ports(1)[0])
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT), port, str(rank)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    rows = [[line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")] for out, _ in outs]
    assert all(len(r) == 1 for r in rows), [err[-2000:] for _, err in outs]
    # (6 + 2) / (2 + 6) and (1 + 3) / 8 on both ranks; rank 0 alone would log 3.0 and 0.5.
    # Resumed, every rank once carried rank 0's first part as its own: ce (6 + 4.5) / 8.
    for row, in rows:
        assert [float(v) for v in row] == pytest.approx([1.0, 0.5, 1.0, 0.5])


def test_epoch_means_of_one_worker_are_plain_means():
    from jobs.common.train_worker import epoch_means

    assert epoch_means({"ce": 6.0, "kd": 1.5}, 3, torch.device("cpu")) == pytest.approx({"ce": 2.0, "kd": 0.5})
