"""DistillTask: which teacher outputs each loss weight needs, and logit distillation
through real (tiny) teacher and student models."""
from __future__ import annotations

import pytest
import torch

from slmrec.losses import DistillWeights
from slmrec.model import build_recommender
from slmrec.tasks import DistillTask
from tests.test_model import item_table, scratch

ITEMS = torch.tensor([[3, 7, 1, 0, 0], [5, 2, 9, 4, 11]])
TARGETS = torch.tensor([[7, 1, 12, 0, 0], [2, 9, 4, 11, 6]])
KD_ONLY = DistillWeights(cos=0.0, l2=0.0, ms=0.0, kd=0.5, kd_temperature=2.0)


def _task(student_seed: int, weights: DistillWeights, student_layers: int = 2) -> tuple[DistillTask, list[bool]]:
    teacher = build_recommender(scratch(layers=2), item_table(), seed=0)
    student = build_recommender(scratch(layers=student_layers), item_table(), seed=student_seed)
    asked_for_layers: list[bool] = []
    forward = teacher.forward

    def spy(items, output_layers=False):
        asked_for_layers.append(output_layers)
        return forward(items, output_layers=output_layers)

    teacher.forward = spy
    return DistillTask(student, teacher=teacher, weights=weights, num_blocks=1), asked_for_layers


def test_kd_alone_runs_the_teacher_without_its_layers_and_distils_its_logits():
    task, asked = _task(student_seed=1, weights=KD_ONLY)
    terms = task.loss({"items": ITEMS, "targets": TARGETS})
    assert asked == [False], "kd needs the teacher's logits only, not its layer outputs"
    assert terms.kd.item() > 0 and terms.cos.item() == terms.l2.item() == 0.0
    assert terms.total.item() == pytest.approx(terms.ce.item() + 0.5 * terms.kd.item(), rel=1e-6)
    terms.total.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.parameters())


def test_kd_of_a_student_identical_to_the_teacher_is_zero():
    task, _ = _task(student_seed=0, weights=KD_ONLY)
    task.model.eval()  # same weights, same mode: the same logits
    assert task.loss({"items": ITEMS, "targets": TARGETS}).kd.item() == pytest.approx(0.0, abs=1e-6)


def test_without_teacher_terms_the_teacher_never_runs():
    task, asked = _task(student_seed=1, weights=DistillWeights(cos=0.0, l2=0.0, ms=0.0), student_layers=1)
    task.loss({"items": ITEMS, "targets": TARGETS})
    assert asked == []
    task.weights = DistillWeights(cos=1.0, l2=0.0, ms=0.0)
    task.loss({"items": ITEMS, "targets": TARGETS})
    assert asked == [True]


def test_build_task_full_finetuning_student_of_a_lora_teacher(tmp_path):
    from jobs.distill import build_task

    teacher = build_recommender(scratch(layers=2, lora="on", lora_r=2), item_table(), seed=0)
    teacher.save(tmp_path / "teacher")
    args = {"teacher": str(tmp_path / "teacher"), "student_layers": 1, "blocks": 1, "aux_heads": 0,
            "weights": {"cos": 1.0, "l2": 0.1, "ms": 0.0}, "student_init": "teacher", "seed": 0}
    lora_student = build_task({**args, "student_finetuning": "teacher"}).model
    full_student = build_task({**args, "student_finetuning": "full"}).model
    assert lora_student.config.backbone.use_lora and not full_student.config.backbone.use_lora
    assert all(p.requires_grad for p in full_student.decoder.parameters())
    counts = lora_student.parameter_counts()["trainable"], full_student.parameter_counts()["trainable"]
    assert counts[0] < counts[1]
    # the full student starts where the LoRA student does: the teacher's first layer
    with torch.no_grad():
        assert torch.allclose(lora_student.eval()(ITEMS).hidden, full_student.eval()(ITEMS).hidden, atol=1e-5)


# Two gloo processes (no Ray): the student in a DeepSpeed engine, the frozen teacher placed
# beside it by the worker's `place_frozen`; each rank prints what it holds.
PLACEMENT_SCRIPT = """
import math, os, sys, torch
sys.path.insert(0, sys.argv[1])
rank = int(sys.argv[3])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK=str(rank), WORLD_SIZE="2",
                  LOCAL_RANK=str(rank))
torch.distributed.init_process_group("gloo")
from jobs.common.deepspeed_engine import init_engine, place_frozen, resolve_ds_config
from slmrec.losses import DistillWeights
from slmrec.model import build_recommender
from slmrec.tasks import DistillTask
from tests.test_model import item_table, scratch
items = torch.tensor([[3, 7, 1, 0, 0], [5, 2, 9, 4, 11]])
targets = torch.tensor([[7, 1, 12, 0, 0], [2, 9, 4, 11, 6]])
for stage, bf16 in [(3, False), (0, True)]:
    teacher = build_recommender(scratch(layers=4), item_table(), seed=0)
    student = build_recommender(scratch(layers=2, aux_heads=1), item_table(), seed=1)
    task = DistillTask(student, teacher=teacher, weights=DistillWeights(), num_blocks=2)
    with torch.no_grad():
        before = teacher(items, output_layers=True).layers
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = resolve_ds_config({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}, 2, 1, 2)
    engine = init_engine(student, optimizer, scheduler, config)
    task.model = engine.module
    kept = [place_frozen(module, engine, config) for module in task.frozen_modules()]
    held = sum(p.numel() for p in teacher.parameters())
    shards = sum(p.ds_tensor.numel() for p in teacher.parameters()) if stage == 3 else held
    with torch.no_grad():
        after = teacher(items, output_layers=True).layers
    diff = max((a.float() - b).abs().max().item() for a, b in zip(after, before))
    dtypes = sorted({str(p.dtype) for p in teacher.parameters()})
    terms = task.loss({"items": items, "targets": targets})
    engine.backward(terms.total)
    engine.step()
    print("RESULT", stage, bf16, held, shards, sum(p.numel() for p in build_recommender(scratch(layers=4),
          item_table()).parameters()), diff, ",".join(dtypes), teacher.item_table.dtype, teacher.training,
          kept[0] is not None, all(math.isfinite(v) for v in terms.as_dict().values()))
"""


def test_teacher_placed_beside_the_student_partitioned_under_zero3():
    # The teacher is not in the student's engine: the worker must still put it on the
    # student's device and precision, and under ZeRO-3 partition it across the workers
    # rather than hold it whole in each.
    import subprocess
    import sys
    from pathlib import Path

    from cluster.local_cluster import free_ports

    root = Path(__file__).resolve().parents[1]
    port = str(free_ports(1)[0])
    ranks = [subprocess.Popen([sys.executable, "-c", PLACEMENT_SCRIPT, str(root), port, str(r)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in ranks]
    for (stdout, stderr), p in zip(outputs, ranks):
        rows = [line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and len(rows) == 2, stdout[-2000:] + stderr[-4000:]
        (stage3, _, held3, shard3, whole, diff3, dtypes3, table3, training3, engine3, finite3), \
            (stage0, _, held0, shard0, _, diff0, dtypes0, table0, training0, engine0, finite0) = rows
        # ZeRO-3: no full weight outside a forward, half of them in this rank's shard
        # (up to per-tensor padding), the same outputs, still frozen in eval mode.
        assert int(held3) == 0 and int(whole) / 2 <= int(shard3) < int(whole) / 2 + 40
        assert float(diff3) < 1e-6 and dtypes3 == "torch.float32" and training3 == "False"
        assert engine3 == "True" and finite3 == "True"
        # ZeRO-0 under bf16: weights cast as DeepSpeed casts the student's, buffers kept fp32.
        assert int(held0) == int(whole) and dtypes0 == "torch.bfloat16" and table0 == "torch.float32"
        assert 0 < float(diff0) < 0.1 and training0 == "False" and engine0 == "False" and finite0 == "True"
