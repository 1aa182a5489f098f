"""End to end through real Ray Train + DeepSpeed on tiny data: stage 0's item table, the
teacher job with two workers, resume after a failure, and the distillation job with every
loss term on."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bench.rescore_protocols import BenchConfig as RescoreConfig, rescore

from jobs.distill import DistillConfig, run as run_distill
from jobs.pretrain_items import PretrainItemsConfig, check_item_table, load_item_table, run as run_items
from jobs.train_teacher import TeacherConfig, run as run_teacher
from pipelines.prepared import SEQUENCES_DIR, vocabulary_digest
from slmrec.backbones import BackboneConfig
from slmrec.checkpoint import save_checkpoint
from slmrec.model import SeqRecommender

TINY = dict(max_len=12, batch_size=8, warmup_steps=2, cpus_per_worker=0.5, eval_batch_size=64, log_every=4,
            lr=1e-2, item_dim=16)


def _item_table(path: Path, num_items: int, **meta) -> Path:
    torch.manual_seed(0)
    table = torch.randn(num_items + 1, 16) * 0.3
    table[0] = 0
    save_checkpoint(path, {"item_table": table}, {"format": "slmrec.ItemTable/1", "num_items": num_items,
                                                  "item_dim": 16, **meta})
    return path


def test_stage0_exports_the_table_it_scored_against(ray_session, tiny_prepared, tmp_path):
    # Also the --train-on-valid path (no validation, the last epoch tested) and two ZeRO-3
    # workers, which partition the embedding table SASRec scores against.
    out = tmp_path / "items"
    config = PretrainItemsConfig(data=str(tiny_prepared), output=str(out), epochs=2, dropout=0.1,
                                 cosine_temperature=0.1, train_on_valid=True, num_workers=2,
                                 deepspeed_config="cluster/deepspeed/zero3.json", **{**TINY, "lr": 5e-3})
    run_items(config)
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["train/ce"] < history[0]["train/ce"]
    assert not any(k.startswith("valid/") for h in history for k in h)
    assert metrics["final"]["best_epoch"] == 2 and metrics["final"]["test_full/NDCG@10"] > 0
    assert "the last epoch, 2, is tested" in (out / "REPORT.md").read_text()
    for name in ("REPORT.md", "report.json", "training_curve.png"):
        assert (out / name).is_file(), name
    table = load_item_table(out, 30, vocabulary_digest(tiny_prepared))
    assert table.shape == (31, 16) and torch.equal(table[0], torch.zeros(16))
    with pytest.raises(ValueError, match="same count, other ids by index"):
        load_item_table(out, 30, "another digest")
    # Cosine logits: the exported rows are the unit rows the model scored against.
    assert torch.allclose(table[1:].norm(dim=1), torch.ones(30), atol=1e-5)


def test_teacher_refuses_an_item_table_of_other_items_before_training(ray_session, tiny_prepared, tmp_path):
    items = _item_table(tmp_path / "items" / "item_table", 30, vocabulary="digest of another prepare")
    config = TeacherConfig(data=str(tiny_prepared), output=str(tmp_path / "t"), item_table=str(items.parent),
                           backbone=BackboneConfig(layers=2, hidden=16, heads=2), **TINY)
    with pytest.raises(SystemExit, match=r"--item-table: .* \(same count, other ids by index"):
        run_teacher(config)
    assert not (tmp_path / "t").exists()
    # A table from before digests were recorded is checked on its item count alone.
    assert check_item_table(_item_table(tmp_path / "old", 30), 30, "any") == tmp_path / "old"
    with pytest.raises(ValueError, match="covers 30 items but the prepared data has 31"):
        check_item_table(tmp_path / "old", 31)


def _two_worker_teacher(data: Path, out: Path, table: Path, zero: int) -> TeacherConfig:
    return TeacherConfig(data=str(data), output=str(out), epochs=3, num_workers=2,
                         deepspeed_config=f"cluster/deepspeed/zero{zero}.json", item_table=str(table),
                         backbone=BackboneConfig(layers=4, hidden=16, heads=2), **TINY)


@pytest.fixture(scope="module")
def teacher_run(ray_session, tiny_prepared, tmp_path_factory):
    """A 4-layer scratch teacher trained by two DeepSpeed (ZeRO-2) workers."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_teacher(_two_worker_teacher(tiny_prepared, out, _item_table(out.parent / "items", 30), zero=2))
    return out


def test_teacher_two_workers_lowers_loss_and_reports(teacher_run, tiny_prepared):
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train/total"] < history[0]["train/total"]
    assert metrics["deepspeed"]["zero_optimization"]["stage"] == 2
    assert metrics["deepspeed"]["train_batch_size"] == 8 * 2  # micro x workers
    final = metrics["final"]
    for protocol in ("test_full", "test_full_masked", "test_sampled999"):
        assert 0.0 <= final[f"{protocol}/NDCG@10"] <= 1.0
    # Excluding the history only removes competitors of the target.
    assert final["test_full_masked/NDCG@10"] >= final["test_full/NDCG@10"]
    # The saved best model is the one that scored best on validation.
    assert final["best_epoch"] == 1 + max(range(3), key=lambda i: history[i]["valid/NDCG@10"])
    for name in ("REPORT.md", "report.json", "training_curve.png"):
        assert (teacher_run / name).is_file(), name
    model = SeqRecommender.load(teacher_run / "best")
    assert model.depth == 4
    assert model.config.vocabulary == vocabulary_digest(tiny_prepared)  # serving checks it
    # ...and the one tested: re-scoring it outside Ray gives the reported test metrics.
    sequences = pq.read_table(tiny_prepared / SEQUENCES_DIR, columns=["item_index"])["item_index"].to_pylist()
    rescored = rescore(str(teacher_run / "best"), sequences, RescoreConfig(model=(), data=str(tiny_prepared)))
    assert rescored["full/NDCG@10"] == pytest.approx(final["test_full/NDCG@10"], abs=1e-5)
    # The item table stayed frozen through DeepSpeed training.
    assert torch.equal(model.item_table, load_item_table(teacher_run.parent / "items", 30))


def test_zero3_teacher_killed_and_resumed_matches_uninterrupted_zero2(teacher_run, tiny_prepared, tmp_path):
    # ZeRO-3 partitions the weights themselves and gathers them per module, collectively:
    # every worker must run as many forwards (evaluation is split by batches) and join
    # every gather (checkpoints are written by rank 0). On resume the optimizer's master
    # copy of the weights must be refreshed (else its first step restores the initial
    # weights) and each worker's AdamW partition reloaded. Same seed and data: ZeRO-2's
    # numbers, uninterrupted.
    out = tmp_path / "run"
    config = _two_worker_teacher(tiny_prepared, out, teacher_run.parent / "items", zero=3)
    # 64 users / 2 workers / batch 8 = 4 steps an epoch: fail in epoch 2, after its step-5
    # checkpoint (its loss sums so far are both workers').
    config = dataclasses.replace(config, checkpoint_every_steps=5)
    with pytest.raises(Exception, match="fault injection"):
        run_teacher(dataclasses.replace(config, fail_after_steps=6))
    # Ray Train keeps checkpoint_manager_snapshot.json beside the checkpoint folders.
    checkpoints = [p for p in (out / "ray").glob("*/checkpoint_*") if p.is_dir()]
    assert checkpoints
    for checkpoint in checkpoints:
        assert sorted(p.name for p in checkpoint.glob("zero-rank*")) == ["zero-rank0", "zero-rank1"], checkpoint
    run_teacher(config)
    zero3, zero2 = (json.loads((d / "metrics.json").read_text()) for d in (out, teacher_run))
    assert zero3["deepspeed"]["zero_optimization"]["stage"] == 3
    assert [h["train/total"] for h in zero3["history"]] == pytest.approx(
        [h["train/total"] for h in zero2["history"]], rel=1e-4)
    assert zero3["final"] == pytest.approx(zero2["final"], abs=1e-4)
    best3, best2 = SeqRecommender.load(out / "best"), SeqRecommender.load(teacher_run / "best")
    for (name, w3), (_, w2) in zip(best3.state_dict().items(), best2.state_dict().items()):
        assert torch.allclose(w3, w2, atol=1e-4), name


def test_teacher_with_gradient_accumulation_resumes_after_failure(ray_session, tiny_prepared, tmp_path):
    out = tmp_path / "run"
    table = _item_table(tmp_path / "items", 30)
    common = dict(data=str(tiny_prepared), output=str(out), epochs=2, item_table=str(table),
                  backbone=BackboneConfig(layers=1, hidden=16, heads=2), **dict(TINY, batch_size=4), grad_accum=2)
    # 64 users / (micro-batch 4 x accumulation 2) = 8 optimiser steps an epoch; steps count
    # the optimiser's, not micro-batches: fail in epoch 2 after its step-10 checkpoint.
    with pytest.raises(Exception, match="fault injection"):
        run_teacher(TeacherConfig(fail_after_steps=11, checkpoint_every_steps=10, **common))
    first_epoch = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in first_epoch] == [1]
    latest = max(p for p in (out / "ray").glob("*/checkpoint_*") if p.is_dir())
    interrupted = json.loads((latest / "meta.json").read_text())["state"]
    assert (interrupted["epoch"], interrupted["global_step"]) == (1, 10)
    run_teacher(TeacherConfig(checkpoint_every_steps=10, **common))
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert [r["step"] for r in metrics["steps"]] == [4, 8, 12, 16]  # logged every 4 steps
    # Epoch 1 came from the checkpoint, not from training again, and epoch 2's time
    # includes its part before the failure.
    assert history[0] == first_epoch[0]
    assert history[1]["epoch_seconds"] >= interrupted["epoch_seconds"] > 0


def test_distill_all_terms_and_report(teacher_run, tiny_prepared, tmp_path):
    """Also the bf16-autocast path: every term (the paper's three and our logit
    distillation) must still be computed and move."""
    out = tmp_path / "student"
    config = DistillConfig(data=str(tiny_prepared), teacher=str(teacher_run), output=str(out), student_layers=2,
                           blocks=2, epochs=2, num_workers=1, bf16_autocast=True, kd_weight=0.5, **TINY)
    run_distill(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["spec"]["bf16_autocast"], "the student trains under bf16 mixed precision"
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["final"].values())
    steps = metrics["steps"]
    assert steps, "per-step loss terms are logged"
    for term in ("ce", "cos", "l2", "ms", "kd"):
        assert all(s[term] > 0 for s in steps), f"{term} is computed at every logged step"
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["train/cos"] < first["train/cos"], "alignment moves the student toward the teacher"
    report = json.loads((out / "report.json").read_text())
    assert set(report["parameters"]) == {"teacher", "student"}
    assert report["parameters"]["student"]["total"] < report["parameters"]["teacher"]["total"]
    assert {(r["model"], r["protocol"]) for r in report["metrics"]} == {
        (m, p) for m in ("teacher", "student") for p in ("full", "full_masked", "sampled999")}
    assert [r["batch_size"] for r in report["inference"]["student"]] == [1, 32, 256]
    assert [r["layer"] for r in next(iter(report["probe"].values()))] == [1, 2, 3, 4]
    assert report["epoch_seconds"]["student"] and report["epoch_seconds"]["teacher"]
    assert report["teacher_setup_differences"] == []  # same length, seed and protocol
    for name in ("REPORT.md", "loss_terms.png", "training_curve.png", "layer_probe.png"):
        assert (out / name).is_file(), name
    assert report["distillation"]["kd"] == 0.5
    assert "0.5 x logit distillation (T = 1.0; not in the paper)" in (out / "REPORT.md").read_text()
    student = SeqRecommender.load(out / "best")
    assert student.depth == 2 and len(student.aux_heads) == 1
    assert student.config.vocabulary == vocabulary_digest(tiny_prepared)


@pytest.mark.parametrize("flags, message", [
    ({"student_layers": 6}, "deeper than the teacher"),
    ({"student_layers": 3, "blocks": 2}, "--blocks 2"),
    ({"student_layers": 2, "blocks": 1}, "--ms-weight > 0 needs --blocks >= 2"),
])
def test_distill_bad_flags_fail_before_training(teacher_run, tiny_prepared, tmp_path, flags, message):
    config = DistillConfig(data=str(tiny_prepared), teacher=str(teacher_run), output=str(tmp_path / "x"), **flags)
    with pytest.raises(SystemExit, match=message):
        run_distill(config)
    assert not (tmp_path / "x").exists()


def test_runs_validated_on_targets_their_upstream_trained_on_are_refused(teacher_run, tiny_prepared, tmp_path):
    import shutil

    from jobs.common.validation_leak import trained_on_valid
    from jobs.distill import validate
    from jobs.train_teacher import ensure_item_table
    from jobs.tune import TuneConfig, run as run_tune

    teacher = tmp_path / "teacher-tov"
    shutil.copytree(teacher_run / "best", teacher / "best")
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    metrics["spec"]["train_on_valid"] = True
    (teacher / "metrics.json").write_text(json.dumps(metrics))
    leak = "was trained on the validation targets"
    student = DistillConfig(data=str(tiny_prepared), teacher=str(teacher), output=str(tmp_path / "x"),
                            student_layers=2, blocks=2)
    with pytest.raises(SystemExit, match=rf"--teacher {teacher}/best {leak}"):
        validate(student, teacher / "best")
    assert validate(dataclasses.replace(student, train_on_valid=True), teacher / "best") == 4
    assert validate(student, teacher_run / "best") == 4  # a teacher that held them out
    with pytest.raises(SystemExit, match=f"--teacher .* {leak}"):
        run_tune(TuneConfig(data=str(tiny_prepared), teacher=str(teacher), output=str(tmp_path / "tune"),
                            student_layers=[2], blocks=2))
    # A stage-0 table trained on them, under a teacher validated on them.
    items = tmp_path / "items"
    _item_table(items / "item_table", 30)
    (items / "metrics.json").write_text(json.dumps({"spec": {"train_on_valid": True}}))
    config = TeacherConfig(data=str(tiny_prepared), output=str(tmp_path / "t"), item_table=str(items))
    with pytest.raises(SystemExit, match=f"--item-table {items} {leak}"):
        ensure_item_table(config, tmp_path / "t")
    assert ensure_item_table(dataclasses.replace(config, train_on_valid=True), tmp_path / "t") == str(items)
    assert not (tmp_path / "x").exists() and not (tmp_path / "tune").exists()
    assert not trained_on_valid(tmp_path / "elsewhere")  # nothing says so: not refused

def test_distill_missing_teacher_files(tiny_prepared, tmp_path):
    (tmp_path / "teacher").mkdir()
    config = DistillConfig(data=str(tiny_prepared), teacher=str(tmp_path / "teacher"), output=str(tmp_path / "x"))
    with pytest.raises(SystemExit, match="expected the output of jobs/train_teacher.py"):
        run_distill(config)


def test_teacher_trains_its_table_with_the_runs_data_resource_and_precision_settings(tmp_path, monkeypatch):
    import jobs.pretrain_items
    from jobs.train_teacher import ensure_item_table

    captured = []
    monkeypatch.setattr(jobs.pretrain_items, "run", captured.append)
    config = TeacherConfig(data="d", output=str(tmp_path), max_len=30, item_epochs=7, epochs=2, lr=5e-3,
                           batch_size=8, torch_threads=2, length_bucket_window=4, bf16_autocast=True,
                           valid_fraction=0.5, train_on_valid=True, checkpoint_every_steps=5, log_every=3,
                           fail_after_steps=9, run_name="t", item_dropout=0.2)
    assert ensure_item_table(config, tmp_path) == str(tmp_path / "items")
    (items,) = captured
    assert isinstance(items, PretrainItemsConfig) and items.output == str(tmp_path / "items")
    assert items.dropout == 0.2
    assert (items.data, items.max_len, items.epochs, items.batch_size, items.torch_threads,
            items.length_bucket_window, items.bf16_autocast, items.valid_fraction, items.train_on_valid,
            items.checkpoint_every_steps, items.log_every, items.run_name) == (
        "d", 30, 7, 8, 2, 4, True, 0.5, True, 5, 3, "t-items")
    # The optimiser's settings stay SASRec's own, and fault injection stays with the teacher.
    assert (items.lr, items.fail_after_steps) == (PretrainItemsConfig.lr, 0)


def test_distill_trains_its_teacher_with_the_runs_settings_but_not_its_fault_injection(tmp_path, monkeypatch):
    import jobs.train_teacher
    from jobs.distill import ensure_teacher

    captured = []
    monkeypatch.setattr(jobs.train_teacher, "run", captured.append)
    config = DistillConfig(data="d", output=str(tmp_path), max_len=30, teacher_epochs=3, epochs=2, batch_size=8,
                           warmup_steps=0, train_on_valid=True, fail_after_steps=9, run_name="s")
    assert ensure_teacher(config, tmp_path) == tmp_path / "teacher" / "best"
    (teacher,) = captured
    assert isinstance(teacher, TeacherConfig) and teacher.output == str(tmp_path / "teacher")
    assert (teacher.data, teacher.max_len, teacher.epochs, teacher.batch_size, teacher.train_on_valid,
            teacher.warmup_steps, teacher.run_name, teacher.fail_after_steps) == (
        "d", 30, 3, 8, True, 1, "s-teacher", 0)

def test_distill_in_gpu_precision_with_a_partitioned_teacher(teacher_run, tiny_prepared, tmp_path):
    # GPU workers get bf16 from DeepSpeed ("auto" in our configs), which casts the weights
    # but keeps buffers such as the item table in fp32; forced on here in CPU workers, with
    # ZeRO-3 partitioning the frozen teacher beside the student.
    ds_config = tmp_path / "zero3_bf16.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    out = tmp_path / "student"
    run_distill(DistillConfig(data=str(tiny_prepared), teacher=str(teacher_run), output=str(out), student_layers=2,
                              blocks=2, epochs=1, num_workers=2, deepspeed_config=str(ds_config), probe=False,
                              **TINY))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["deepspeed"]["bf16"]["enabled"] is True
    assert metrics["deepspeed"]["zero_optimization"]["stage"] == 3
    for term in ("ce", "cos", "l2", "ms"):
        assert all(torch.isfinite(torch.tensor(s[term])) and s[term] > 0 for s in metrics["steps"]), term
    assert 0.0 < metrics["final"]["test_full/NDCG@10"] <= 1.0
    student = SeqRecommender.load(out / "best")
    assert student.depth == 2 and student.item_table.dtype == torch.float32
