"""Loss terms against hand-computed values; zero weights; gradients reach only the student."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import slmrec.losses as losses
from slmrec.losses import (
    DistillWeights,
    direction_alignment,
    distillation_loss,
    logit_distillation,
    multiple_supervision,
    next_item_ce,
    norm_regularisation,
)

LN3 = math.log(3.0)
# Logits over items 1..2 (column j = item j+1; padding has no column):
#   logits (0, ln3) -> p = (1/4, 3/4): CE(target 2) = -ln(3/4) = 0.2876820725, CE(target 1) = ln 4 = 1.3862943611
CE_T2 = 0.2876820725
CE_T1 = 1.3862943611
LOGITS = torch.tensor([[[0.0, LN3], [0.0, LN3], [9.0, -9.0]]])  # [B=1, L=3, N=2]
TARGETS = torch.tensor([[2, 1, 0]])  # last position is padding
MASK = TARGETS != 0

# Block 1: student (1,0), (1,1) vs teacher (1,0), (1,0); third position masked out.
HS1 = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
HT1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
# Block 2: student (3,4), (1,1) vs teacher (0,0), (1,0).
HS2 = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [9.0, 9.0]]])
HT2 = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])


def test_next_item_ce_hand_computed():
    assert next_item_ce(LOGITS[0, 0], torch.tensor(2)) == pytest.approx(CE_T2, abs=1e-6)
    # [B, L] form: mean over the two non-padding positions = (0.28768 + 1.38629) / 2
    assert next_item_ce(LOGITS, TARGETS) == pytest.approx((CE_T2 + CE_T1) / 2, abs=1e-6)
    # [B, N] form
    assert next_item_ce(LOGITS[:, 1], torch.tensor([1])) == pytest.approx(CE_T1, abs=1e-6)
    # the kept positions alone (as a training step passes them) give the same mean
    assert next_item_ce(LOGITS[MASK], TARGETS[MASK]) == pytest.approx((CE_T2 + CE_T1) / 2, abs=1e-6)


def test_next_item_ce_of_bf16_logits_is_computed_in_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(64, 3000) * 4).bfloat16().requires_grad_()
    targets = torch.randint(1, 3001, (64,))
    loss = next_item_ce(logits, targets)
    exact = F.cross_entropy(logits.detach().double(), targets - 1)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(exact.item(), rel=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16  # the gradient flows back in the logits' precision

def test_next_item_ce_errors():
    with pytest.raises(ValueError, match="padding"):
        next_item_ce(LOGITS, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="1..2"):
        next_item_ce(LOGITS, torch.tensor([[3, 0, 0]]))
    with pytest.raises(ValueError, match="disagree"):
        next_item_ce(LOGITS, torch.tensor([2, 1]))


def test_direction_alignment_hand_computed():
    # cos = 1 and 1/sqrt(2) -> 1 - cos = 0 and 0.2928932 -> mean 0.1464466
    assert direction_alignment(HS1, HT1, MASK) == pytest.approx(0.1464466, abs=1e-6)
    # block 2: cos with a zero teacher vector is 0 -> 1; then 0.2928932 -> mean 0.6464466
    assert direction_alignment(HS2, HT2, MASK) == pytest.approx(0.6464466, abs=1e-6)
    # no mask on [B, H] inputs: cos((1,1),(1,0)) -> 0.2928932
    assert direction_alignment(HS1[:, 1], HT1[:, 1], None) == pytest.approx(0.2928932, abs=1e-6)


def test_norm_regularisation_hand_computed():
    # distance: ||(3,4)-(0,0)|| = 5, ||(1,1)-(1,0)|| = 1 -> mean 3
    assert norm_regularisation(HS2, HT2, MASK) == pytest.approx(3.0, abs=1e-6)
    # norm: |5 - 0| = 5, |sqrt(2) - 1| = 0.4142136 -> mean 2.7071068
    assert norm_regularisation(HS2, HT2, MASK, mode="norm") == pytest.approx(2.7071068, abs=1e-6)
    with pytest.raises(ValueError, match="norm mode"):
        norm_regularisation(HS2, HT2, MASK, mode="l1")


def test_alignment_input_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        direction_alignment(HS1, HT1[..., :1], MASK)
    with pytest.raises(ValueError, match="mask must be bool"):
        norm_regularisation(HS1, HT1, MASK.long())
    with pytest.raises(ValueError, match="no valid position"):
        direction_alignment(HS1, HT1, torch.zeros_like(MASK))


def test_multiple_supervision_sums_heads():
    # head 1: logits (0, ln3), target 2 -> 0.2876821; head 2: (ln3, 0), target 2 -> ln 4
    heads = [torch.tensor([[0.0, LN3]]), torch.tensor([[LN3, 0.0]])]
    assert multiple_supervision(heads, torch.tensor([2])) == pytest.approx(CE_T2 + CE_T1, abs=1e-6)
    assert multiple_supervision([], torch.tensor([2])) == 0.0


def _leaves():
    student = [t.clone().requires_grad_() for t in (LOGITS, LOGITS, HS1, HS2)]
    teacher = [t.clone().requires_grad_() for t in (HT1, HT2)]
    return student, teacher


def test_distillation_loss_total_and_terms():
    (logits, aux, s1, s2), teacher = _leaves()
    terms = distillation_loss(logits, [aux], [s1, s2], teacher, TARGETS, MASK, DistillWeights(cos=1.0, l2=0.1, ms=1.0))
    # ce = ms = (0.2876821 + 1.3862944) / 2 = 0.8369882 (the one aux head sees the same logits)
    # cos = 0.1464466 + 0.6464466 = 0.7928932 (summed over blocks)
    # l2  = mean(0, 1) + mean(5, 1) = 0.5 + 3 = 3.5
    # total = 0.8369882 + 1.0 * 0.7928932 + 0.1 * 3.5 + 1.0 * 0.8369882 = 2.8168696
    got = terms.as_dict()
    assert list(got) == ["total", "ce", "cos", "l2", "ms", "kd"]
    assert got["kd"] == 0.0, "logit distillation is off unless asked for"
    expected = {"ce": 0.8369882, "cos": 0.7928932, "l2": 3.5, "ms": 0.8369882, "total": 2.8168696}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    terms.total.backward()
    # every term reaches the student (block 1's first position has zero distance: still finite)
    for leaf in (logits, aux, s1, s2):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    # the frozen teacher receives nothing
    assert all(t.grad is None for t in teacher)


def test_norm_mode_is_passed_through():
    (logits, aux, s1, s2), teacher = _leaves()
    terms = distillation_loss(logits, [aux], [s1, s2], teacher, TARGETS, MASK, DistillWeights(norm_mode="norm"))
    # block 1 norms: |1-1| = 0, |sqrt2-1| = 0.4142136 -> 0.2071068; block 2: 2.7071068 -> sum 2.9142136
    assert terms.l2.item() == pytest.approx(2.9142136, abs=1e-6)


def test_zero_weight_terms_are_not_computed(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    for name in ("direction_alignment", "norm_regularisation", "multiple_supervision", "logit_distillation"):
        monkeypatch.setattr(losses, name, must_not_run)
    logits = LOGITS.clone().requires_grad_()
    # blocks, aux heads and teacher logits may be absent when their weights are 0
    terms = distillation_loss(logits, [], [], [], TARGETS, MASK, DistillWeights(cos=0.0, l2=0.0, ms=0.0, kd=0.0))
    for name in ("cos", "l2", "ms", "kd"):
        term = getattr(terms, name)
        assert term.item() == 0.0 and term.grad_fn is None and not term.requires_grad, name
    assert terms.total.item() == pytest.approx(terms.ce.item())
    assert terms.total.grad_fn is not None


def test_one_zero_weight_leaves_the_others():
    (logits, aux, s1, s2), teacher = _leaves()
    terms = distillation_loss(logits, [aux], [s1, s2], teacher, TARGETS, MASK, DistillWeights(cos=1.0, l2=0.0, ms=1.0))
    assert terms.l2.grad_fn is None and terms.cos.grad_fn is not None and terms.ms.grad_fn is not None
    # total = 0.8369882 + 0.7928932 + 0.8369882
    assert terms.total.item() == pytest.approx(2.4668696, abs=1e-6)


def test_distillation_input_errors():
    (logits, aux, s1, s2), teacher = _leaves()
    with pytest.raises(ValueError, match="same non-zero number"):
        distillation_loss(logits, [aux], [s1], teacher, TARGETS, MASK)
    with pytest.raises(ValueError, match="no auxiliary head"):
        distillation_loss(logits, [], [s1, s2], teacher, TARGETS, MASK)
    with pytest.raises(ValueError, match="one auxiliary head per block"):
        distillation_loss(logits, [aux, aux], [s1, s2], teacher, TARGETS, MASK)
    with pytest.raises(ValueError, match=">= 0"):
        DistillWeights(cos=-1.0)
    with pytest.raises(ValueError, match="no teacher logits"):
        distillation_loss(logits, [aux], [s1, s2], teacher, TARGETS, MASK, DistillWeights(kd=1.0))
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):
        DistillWeights(kd=1.0, kd_temperature=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        logit_distillation(LOGITS, LOGITS[..., :1], TARGETS)


# Teacher logits over items 1..2: position 1 (ln3, 0) -> p_t = (3/4, 1/4) against the student's
# (1/4, 3/4); position 2 equals the student's (KL 0); position 3 is padding, where they
# differ: it must not count.
TEACHER_LOGITS = torch.tensor([[[LN3, 0.0], [0.0, LN3], [-9.0, 9.0]]])


def test_logit_distillation_hand_computed():
    # T = 1: KL at position 1 = 3/4 ln 3 - 1/4 ln 3 = ln(3) / 2 = 0.5493061; mean over 2 targets
    assert logit_distillation(LOGITS, TEACHER_LOGITS, TARGETS).item() == pytest.approx(0.2746531, abs=1e-6)
    # T = 2: p = softmax(logits / 2) -> (0.6339746, 0.3660254) vs its mirror image;
    # KL = (0.6339746 - 0.3660254) * ln(sqrt 3) = 0.1471861, times T^2 = 4, mean over 2 targets
    assert logit_distillation(LOGITS, TEACHER_LOGITS, TARGETS, temperature=2.0).item() == pytest.approx(
        0.2943722, abs=1e-6)
    assert logit_distillation(TEACHER_LOGITS, TEACHER_LOGITS, TARGETS).item() == pytest.approx(0.0, abs=1e-7)
    # the kept positions alone give the same mean
    assert logit_distillation(LOGITS[MASK], TEACHER_LOGITS[MASK], TARGETS[MASK]).item() == pytest.approx(
        0.2746531, abs=1e-6)


def test_logit_distillation_in_the_total_reaches_only_the_student():
    logits = LOGITS.clone().requires_grad_()
    teacher_logits = TEACHER_LOGITS.clone().requires_grad_()
    terms = distillation_loss(logits, [], [], [], TARGETS, MASK, DistillWeights(cos=0.0, l2=0.0, ms=0.0, kd=0.5),
                              teacher_logits=teacher_logits)
    assert terms.kd.item() == pytest.approx(0.2746531, abs=1e-6)
    assert terms.total.item() == pytest.approx((CE_T2 + CE_T1) / 2 + 0.5 * 0.2746531, abs=1e-6)
    terms.total.backward()
    assert logits.grad.abs().sum() > 0 and teacher_logits.grad is None


def test_one_step_on_logit_distillation_moves_the_student_ranking_toward_the_teacher():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=g)
    teacher_logits = torch.randn(4, 5, 11, generator=g) * 3
    targets = torch.randint(1, 11, (4, 5), generator=g)
    targets[:, 3:] = 0
    torch.manual_seed(0)
    student = torch.nn.Linear(8, 11)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = logit_distillation(student(x), teacher_logits, targets).item()
    logit_distillation(student(x), teacher_logits, targets).backward()
    opt.step()
    assert logit_distillation(student(x), teacher_logits, targets).item() < before


def _student_and_teacher():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=g)
    h_t = torch.randn(4, 5, 8, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, 3:] = False  # right padding
    torch.manual_seed(0)
    return torch.nn.Linear(8, 8), x, h_t, mask


def _masked_cos(a, b, mask):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)[mask].mean().item()


def test_one_step_on_direction_alignment_raises_cosine():
    student, x, h_t, mask = _student_and_teacher()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = _masked_cos(student(x), h_t, mask)
    direction_alignment(student(x), h_t, mask).backward()
    opt.step()
    after = _masked_cos(student(x), h_t, mask)
    assert after > before + 1e-3, (before, after)


@pytest.mark.parametrize("mode", ["distance", "norm"])
def test_one_step_on_norm_regularisation_lowers_it(mode):
    student, x, h_t, mask = _student_and_teacher()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = norm_regularisation(student(x), h_t, mask, mode)
    before.backward()
    opt.step()
    after = norm_regularisation(student(x), h_t, mask, mode)
    assert after.item() < before.item() - 1e-3, (before.item(), after.item())
