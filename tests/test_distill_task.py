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
