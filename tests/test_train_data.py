"""The training jobs' data and resource plumbing: validation subset, CPUs left for Ray Data."""
from __future__ import annotations

import pytest
import torch

from jobs.common.data import in_validation_subset, load_splits
from jobs.common.trainer import fit, make_spec
from jobs.train_teacher import TeacherConfig


def test_validation_subset_is_stable_nested_and_about_the_fraction():
    users = [f"u{i}" for i in range(4000)]
    half = {u for u in users if in_validation_subset(u, 0.5)}
    tenth = {u for u in users if in_validation_subset(u, 0.1)}
    assert all(in_validation_subset(u, 1.0) for u in users)
    assert tenth < half  # a smaller fraction keeps a subset of a larger one's users
    assert 1800 < len(half) < 2200 and 300 < len(tenth) < 500
    assert half == {u for u in users if in_validation_subset(u, 0.5)}


@pytest.fixture(scope="module")
def held_out(ray_session, tiny_prepared):
    """The default splits (validation item held out), shared: each load materialises the
    evaluation sets."""
    return load_splits(str(tiny_prepared), 12)


def test_valid_fraction_shrinks_validation_only(held_out, tiny_prepared):
    full = held_out
    part = load_splits(str(tiny_prepared), 12, valid_fraction=0.3)
    assert 0 < part.valid.count() < full.valid.count()
    assert part.test.count() == full.test.count() == full.valid.count()
    with pytest.raises(ValueError, match="--valid-fraction must be in"):
        load_splits(str(tiny_prepared), 12, valid_fraction=0.0)


def test_train_on_valid_trains_on_every_validation_target(held_out, tiny_prepared):
    def last_targets(rows):
        return sorted(int(r["targets"][r["targets"] != 0][-1]) for r in rows if r["targets"].any())

    trained = load_splits(str(tiny_prepared), 12, train_on_valid=True)
    valid_targets = sorted(int(r["targets"]) for r in held_out.valid.take_all())
    assert last_targets(trained.train.take_all()) == valid_targets
    assert last_targets(held_out.train.take_all()) != valid_targets
    # The test split is untouched.
    assert sorted(int(r["targets"]) for r in trained.test.take_all()) == \
        sorted(int(r["targets"]) for r in held_out.test.take_all())


def test_workers_that_take_every_cpu_are_refused(ray_session, tiny_prepared, tmp_path):
    # The test session's Ray has 2 CPUs; two 1-CPU workers would leave Ray Data none and hang.
    config = TeacherConfig(data=str(tiny_prepared), output=str(tmp_path / "t"), num_workers=2, cpus_per_worker=1.0,
                           batch_size=4)
    spec = make_spec(config, config.output, train_rows=64)
    with pytest.raises(SystemExit, match="leaving none for Ray Data"):
        fit(config, spec, build_task=None, task_args={}, datasets={}, run_name="refused")


def test_gpu_workers_on_a_local_ray_without_gpus_are_refused(ray_session, tiny_prepared, tmp_path, monkeypatch,
                                                            capsys):
    from jobs.common import ray_runtime

    config = TeacherConfig(data=str(tiny_prepared), output=str(tmp_path / "t"), use_gpu=True, batch_size=4)
    spec = make_spec(config, config.output, train_rows=64)
    # Ray would keep the worker pending forever: no node of a local instance ever gains a GPU.
    with pytest.raises(SystemExit, match=r"--use-gpu with --num-workers 1 asks for 1 GPU\(s\), and this machine's "
                                         r"local Ray has 0"):
        fit(config, spec, build_task=None, task_args={}, datasets={}, run_name="refused")
    # On a cluster an autoscaler may add GPU nodes: the wait is announced, not refused.
    monkeypatch.setattr(ray_runtime, "_started_here", False)
    ray_runtime.check_gpus(2, "--gpus-per-actor 2")
    assert "the job waits until the autoscaler adds them" in capsys.readouterr().out
    ray_runtime.check_gpus(0, "--gpus-per-actor 0")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("batches,world,taken,short", [
    (5, 2, [3, 2], [0, 1]),
    (4, 2, [2, 2], [0, 0]),
    (1, 3, [1, 0, 0], [0, 1, 1]),
    (0, 2, [0, 0], [0, 0]),
])
def test_evaluation_share_says_how_many_forwards_a_rank_is_short(batches, world, taken, short):
    from jobs.common.train_worker import _Share

    for rank in range(world):
        share = _Share(({"i": i} for i in range(batches)), rank, world)
        got = [b["i"] for b in share]
        assert got == list(range(rank, batches, world)) and len(got) == taken[rank]
        assert share.short_by() == short[rank]


def test_metric_sums_are_reduced_on_the_workers_device(monkeypatch):
    # NCCL, the GPU workers' backend, reduces CUDA tensors only; the sums live on the CPU.
    from jobs.common.train_worker import all_reduce_sum

    reduced = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: reduced.append((t.device, t.dtype)))
    out = all_reduce_sum(torch.zeros(3, dtype=torch.float64), torch.device("meta"))
    assert reduced == [(torch.device("meta"), torch.float64)] and out.device == torch.device("meta")


@pytest.mark.parametrize("rows, workers, accum, fits", [
    (64, 1, 1, True), (63, 1, 1, False),  # --batch-size 64
    (128, 1, 2, True), (127, 1, 2, False), (100, 1, 2, False),  # one micro-batch, not one step
    (256, 2, 2, True), (255, 2, 2, False),
])
def test_a_run_must_fill_one_optimiser_step_per_worker(tmp_path, rows, workers, accum, fits):
    config = TeacherConfig(data="unused", output=str(tmp_path / "t"), batch_size=64, grad_accum=accum,
                           num_workers=workers)
    if fits:
        assert make_spec(config, config.output, train_rows=rows).grad_accum == accum
    else:
        with pytest.raises(ValueError,
                           match=f"cannot fill one optimiser step of --batch-size 64 x --grad-accum {accum}"):
            make_spec(config, config.output, train_rows=rows)


def test_the_training_split_gives_each_worker_the_same_rows_in_the_same_order_every_run(ray_session):
    # Tasks that finish in a different order each run; without preserve_order the split
    # handed blocks out as they finished, so a resumed run's workers skipped other rows.
    import random
    import threading
    import time

    import ray

    from jobs.common.trainer import training_data_config

    def jittered(batch):
        time.sleep(random.random() * 0.1)
        return batch

    dataset = ray.data.range(400, override_num_blocks=20).map_batches(jittered)

    def run() -> list[list[int]]:
        shards = [it["train"] for it in training_data_config().configure({"train": dataset}, 2, None, None)]
        rows: list[list[int]] = [[], []]

        def consume(i):
            rows[i] = [int(x) for batch in shards[i].iter_batches(batch_size=None) for x in batch["id"]]

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return rows

    first = run()
    assert sorted(first[0] + first[1]) == list(range(400)) and len(first[0]) == len(first[1])
    assert run() == first
