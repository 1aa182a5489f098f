"""Resumable checkpoints under every DeepSpeed ZeRO stage (jobs/common/train_checkpoint.py):
the weights snapshot, the per-rank optimizer partitions, and weights loaded into a real
DeepSpeed engine staying loaded through its next step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_best_weights_are_a_snapshot_not_the_live_parameters():
    # Kept for the final test while training goes on: on CPU they once aliased the
    # parameters, so every run tested its last epoch whatever validation chose.
    from jobs.common.train_checkpoint import trainable_state

    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    snapshot = trainable_state(model)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert set(snapshot) == {"weight"}
    assert torch.equal(snapshot["weight"], before)


def _fake_zero_engine(sizes):
    """The two attributes of a DeepSpeed ZeRO-1/2 engine the shard code reads."""
    from types import SimpleNamespace

    partitions = [torch.zeros(n) for n in sizes]
    base = SimpleNamespace(state={p: {} for p in partitions})
    return SimpleNamespace(optimizer=SimpleNamespace(single_partition_of_fp32_groups=partitions, optimizer=base))


def test_zero_optimizer_partitions_round_trip_and_refuse_another_layout(tmp_path):
    from jobs.common.train_checkpoint import restore_zero_shard, save_zero_shard

    saved = _fake_zero_engine([3, 2])
    p0, p1 = saved.optimizer.single_partition_of_fp32_groups
    saved.optimizer.optimizer.state[p0] = {"step": torch.tensor(7.0), "exp_avg": torch.arange(3.0),
                                           "exp_avg_sq": torch.ones(3)}
    saved.optimizer.optimizer.state[p1] = {"step": torch.tensor(7.0), "exp_avg": torch.tensor([5.0, 6.0]),
                                           "exp_avg_sq": torch.full((2,), 2.0)}
    save_zero_shard(str(tmp_path), saved, zero=2, rank=1, world=2)

    restored = _fake_zero_engine([3, 2])
    assert restore_zero_shard(str(tmp_path), restored, zero=2, rank=1, world=2) is None
    q0, q1 = restored.optimizer.single_partition_of_fp32_groups
    state = restored.optimizer.optimizer.state
    assert torch.equal(state[q0]["exp_avg"], torch.arange(3.0)) and float(state[q1]["step"]) == 7.0
    assert torch.equal(state[q1]["exp_avg_sq"], torch.full((2,), 2.0))

    assert "no optimizer partition" in restore_zero_shard(str(tmp_path), _fake_zero_engine([3, 2]), 2, 0, 2)
    assert "saved by 2 workers under ZeRO-2, this run has 4 under ZeRO-2" in restore_zero_shard(
        str(tmp_path), _fake_zero_engine([3, 2]), 2, 1, 4)
    assert "hold [3, 2] weights, this worker's [4, 1]" in restore_zero_shard(
        str(tmp_path), _fake_zero_engine([4, 1]), 2, 1, 2)


# One process (world size 1, gloo) per run, so the test session's own process holds no
# torch.distributed state. For each optimizer DeepSpeed builds: load weights of 7.0, take a
# step with lr 0, print what the module holds.
ENGINE_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group("gloo")
from jobs.common.deepspeed_engine import init_engine, resolve_ds_config
from jobs.common.train_checkpoint import full_params, load_weights
for stage, bf16 in [(0, False), (0, True), (2, False), (3, False)]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = resolve_ds_config({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}, 2, 1, 1)
    engine = init_engine(model, optimizer, scheduler, config)
    load_weights(engine, stage, {n: torch.full(tuple(getattr(p, "ds_shape", p.shape)), 7.0)
                                 for n, p in engine.module.named_parameters()}, "test")
    x = torch.randn(2, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
    engine.backward(engine(x).float().sum())
    engine.step()
    with full_params(engine, stage):
        values = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    print(f"RESULT {stage} {bf16} {type(engine.optimizer).__name__} {values.min().item()} {values.max().item()}")
"""


def _result_rows(script: str, expected: int) -> list[list[str]]:
    """Run a world-size-1 engine script in its own process; the fields of its RESULT lines."""
    from cluster.local_cluster import free_ports

    out = subprocess.run([sys.executable, "-c", script, str(ROOT), str(free_ports(1)[0])],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(rows) == expected, out.stdout[-2000:] + out.stderr[-4000:]
    return rows


def test_loaded_weights_survive_the_next_deepspeed_step():
    # ZeRO >= 1 and bf16 step an fp32 master copy of the weights; resuming once loaded the
    # module only, and the first step put the initial weights back.
    rows = _result_rows(ENGINE_SCRIPT, 4)
    for stage, bf16, optimizer, low, high in rows:
        assert float(low) == float(high) == 7.0, f"ZeRO-{stage} bf16={bf16} ({optimizer}): {low}..{high}"
    # The cases that hold a master copy are among them (the plain one holds none).
    assert {r[2] for r in rows} >= {"DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"}


def test_an_unknown_zero_optimizer_loses_its_moments_not_the_run(tmp_path, caplog):
    from types import SimpleNamespace

    from jobs.common.train_checkpoint import restore_zero_shard, save_zero_shard

    unknown = SimpleNamespace(optimizer=SimpleNamespace(optimizer=SimpleNamespace(state={})))
    with caplog.at_level("WARNING", logger="slmrec.train"):
        save_zero_shard(str(tmp_path), unknown, zero=2, rank=0, world=1)
    assert not (tmp_path / "zero-rank0").exists()
    assert "SimpleNamespace has no fp32 partitions" in caplog.text
    # A shard written by a known optimizer is not applied to an unknown one.
    save_zero_shard(str(tmp_path), _fake_zero_engine([2]), zero=2, rank=0, world=1)
    assert "no fp32 partitions this code knows" in restore_zero_shard(str(tmp_path), unknown, 2, 0, 1)


# Train 3 steps, checkpoint, 3 more; a fresh engine restored from the checkpoint takes the
# same 3 steps. Under bf16 the optimizer steps fp32 masters of its own: restored from the
# bf16 module weights alone, the resumed run drifted by one bf16 ulp within 3 steps. The
# dropout masks must continue too: reseeded, the resumed run drew other ones.
RESUME_SCRIPT = """
import os, sys, tempfile, torch
sys.path.insert(0, sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group("gloo")
from jobs.common.deepspeed_engine import init_engine, resolve_ds_config
from jobs.common.train_checkpoint import full_params, restore, write_checkpoint

def build(stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = resolve_ds_config({"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}, 2, 1, 1)
    return init_engine(model, optimizer, scheduler, config), optimizer

def steps(engine, first, last):
    for i in range(first, last):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        engine.backward(engine(x).float().pow(2).sum())
        engine.step()

def weights(engine, stage):
    with full_params(engine, stage):
        return torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])

for stage in (0, 2, 3):
    engine, optimizer = build(stage)
    steps(engine, 0, 3)
    directory = os.path.join(tempfile.mkdtemp(), "ckpt")
    write_checkpoint(directory, {}, {}, engine, optimizer, stage, 0, 1)
    steps(engine, 3, 6)
    resumed, resumed_optimizer = build(stage)
    restore(directory, resumed, resumed_optimizer, stage, 0, 1)
    steps(resumed, 3, 6)
    drift = (weights(engine, stage) - weights(resumed, stage)).abs().max().item()
    print(f"RESULT {stage} {type(engine.optimizer).__name__} {drift}")
"""


def test_bf16_runs_resume_bit_exact():
    for stage, optimizer, drift in _result_rows(RESUME_SCRIPT, 3):
        assert float(drift) == 0.0, f"ZeRO-{stage} bf16 ({optimizer}) drifted by {drift} after a resume"


def test_saved_masters_of_another_layout_are_refused():
    from jobs.common.train_checkpoint import _restore_masters

    masters = [torch.zeros(2), torch.zeros(3)]
    assert _restore_masters(masters, {}) is None  # an fp32 run saved none
    assert "do not match" in _restore_masters(masters, {"0": torch.ones(2)})
    assert "do not match" in _restore_masters(masters, {"0": torch.ones(2), "1": torch.ones(4)})
    assert _restore_masters(masters, {"0": torch.ones(2), "1": torch.full((3,), 2.0)}) is None
    assert torch.equal(masters[1], torch.full((3,), 2.0))


def test_the_final_test_reports_no_checkpoint_of_the_best_weights(tmp_path, monkeypatch):
    # The test runs on the best epoch's weights; a checkpoint of them would become the latest
    # one, and a rerun with more --epochs would resume from the best epoch's weights with
    # the last epoch's step, schedule and AdamW moments.
    from jobs.common import train_worker

    reports = []
    loaded = []
    monkeypatch.setattr(train_worker, "load_weights", lambda engine, zero, weights, what: loaded.append(weights))
    monkeypatch.setattr(train_worker, "_evaluate", lambda task, split, spec, protocols, rank, world:
                        [{"NDCG@10": 0.5}] * len(protocols))
    monkeypatch.setattr(train_worker, "report", lambda metrics, state, *rest: reports.append((metrics, state)))
    spec = train_worker.TrainSpec(output_dir=str(tmp_path))
    state = {"epoch": 3, "global_step": 30, "best": 0.4, "best_epoch": 1, "history": [], "steps": []}
    best = {"weight": torch.ones(2)}
    train_worker._final_test(None, spec, state, best, None, None, 0, 0, 1, tmp_path)
    assert loaded == [best]
    [(metrics, checkpoint_state)] = reports
    assert checkpoint_state is None
    assert metrics["best_epoch"] == 1 and metrics["test_full_masked/NDCG@10"] == 0.5
    assert (tmp_path / "metrics.json").is_file()


def test_random_state_continues_per_rank_and_is_left_alone_when_it_cannot(tmp_path):
    from jobs.common.train_checkpoint import restore_rng, save_rng

    torch.manual_seed(3)
    save_rng(str(tmp_path), rank=1, world=2)
    expected = torch.rand(4)
    torch.manual_seed(99)
    assert restore_rng(str(tmp_path), rank=1, world=2) is None
    assert torch.equal(torch.rand(4), expected)
    # Another layout's state or none at all: the run goes on from its seed, with the reason.
    torch.manual_seed(99)
    seeded = torch.get_rng_state()
    assert restore_rng(str(tmp_path), rank=1, world=3) == "it was saved by 2 workers, this run has 3"
    assert restore_rng(str(tmp_path), rank=0, world=2) == "the checkpoint has no random state for this worker"
    assert torch.equal(torch.get_rng_state(), seeded)
