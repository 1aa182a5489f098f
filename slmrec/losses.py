"""Training losses: next-item cross-entropy, SLMRec's three distillation terms, and an
optional logit-distillation term that is not part of the paper (off by default).

Conventions: logits score items 1..N, column j = item j+1 (padding, item 0, has no column:
it is never a prediction; `slmrec.scoring.item_scores`); targets are item ids and those
equal to 0 are padding and are not counted. Training steps pass the logits of the positions
that have a target only ([n, N] with targets [n]); [B, L, N] with padded targets [B, L]
works the same. Hidden states are [B, L, H] with a bool mask [B, L] of valid positions (or
[B, H] with mask None).

Causal training note: the paper aligns teacher and student at the LAST position of a
sequence. We train on every prefix in one causal pass, where each valid position is the
last position of its own prefix, so the alignment terms are means over valid positions;
with one position per sequence they reduce to the paper's definition.

Teacher tensors are detached inside every function here: the teacher is frozen, and a
gradient reaching it would silently turn distillation into co-training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

NormMode = Literal["distance", "norm"]

# Every loss term a training step reports, in logging order.
TERM_NAMES = ("total", "ce", "cos", "l2", "ms", "kd")


def next_item_ce(logits: Tensor, targets: Tensor, ignore_index: int = 0) -> Tensor:
    """Mean cross-entropy over positions whose target is not `ignore_index` (padding).

    logits [..., N] over items 1..N with targets [...] (item ids 1..N, or padding).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
            "expected logits [..., N] with targets [...]")
    num_items = logits.shape[-1]
    keep = targets != ignore_index
    if not keep.any():
        raise ValueError("every target is padding; the cross-entropy of an empty batch is undefined")
    kept = targets[keep]
    if int(kept.min()) < 1 or int(kept.max()) > num_items:
        raise ValueError(
            f"targets must be items in 1..{num_items} (0 is padding), got values in "
            f"[{int(kept.min())}, {int(kept.max())}]")
    # Item i is column i - 1; padding maps to ignore_index - 1, which cross_entropy skips.
    # In fp32: a bf16 log-softmax over N items (DeepSpeed's bf16 on GPUs) rounds the loss
    # and its gradient to 8 bits of mantissa.
    return F.cross_entropy(logits.reshape(-1, num_items).float(), (targets - 1).reshape(-1),
                           ignore_index=ignore_index - 1)


def _check_pair(h_s: Tensor, h_t: Tensor, mask: Tensor | None) -> None:
    if h_s.shape != h_t.shape:
        raise ValueError(
            f"student {tuple(h_s.shape)} and teacher {tuple(h_t.shape)} hidden states differ in shape; "
            "alignment needs the same hidden size and positions")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != h_s.shape[:-1]):
        raise ValueError(
            f"mask must be bool {tuple(h_s.shape[:-1])} (valid positions), got {mask.dtype} {tuple(mask.shape)}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    if not mask.any():
        raise ValueError("mask has no valid position; the mean is undefined")
    return values[mask].mean()


def direction_alignment(h_s: Tensor, h_t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Feature direction alignment: mean over valid positions of 1 - cos(h_s, h_t)."""
    _check_pair(h_s, h_t, mask)
    cos = F.cosine_similarity(h_s, h_t.detach(), dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cos, mask)


def norm_regularisation(h_s: Tensor, h_t: Tensor, mask: Tensor | None = None,
                        mode: NormMode = "distance") -> Tensor:
    """Feature norm regularisation, mean over valid positions.

    mode="distance" (default, as the reference code): ||h_s - h_t||_2 per position.
    mode="norm" (the paper's wording): | ||h_s||_2 - ||h_t||_2 | per position.
    """
    _check_pair(h_s, h_t, mask)
    h_t = h_t.detach()
    if mode == "distance":
        per_position = torch.linalg.vector_norm(h_s - h_t, dim=-1)
    elif mode == "norm":
        per_position = (torch.linalg.vector_norm(h_s, dim=-1) - torch.linalg.vector_norm(h_t, dim=-1)).abs()
    else:
        raise ValueError(f"norm mode must be 'distance' or 'norm', got {mode!r}")
    return _masked_mean(per_position, mask)


def multiple_supervision(aux_logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Sum over the extra heads of each head's next-item cross-entropy (0 with no heads)."""
    if not aux_logits:
        return torch.zeros((), device=targets.device)
    return torch.stack([next_item_ce(logits, targets) for logits in aux_logits]).sum()


def logit_distillation(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                       temperature: float = 1.0, ignore_index: int = 0) -> Tensor:
    """Mean over non-padding targets of T^2 * KL(softmax(t/T) || softmax(s/T)) (logits over
    items 1..N, as next_item_ce).

    Not one of SLMRec's terms: the classic response-based distillation (Hinton et al.),
    which hands the student the teacher's whole ranking instead of one target item. The
    T^2 factor keeps its gradient scale independent of the temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = targets != ignore_index
    if not keep.any():
        raise ValueError("every target is padding; the distillation mean is undefined")
    if not keep.all():  # a training step passes kept positions only: no copy needed then
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


@dataclass(frozen=True)
class DistillWeights:
    """Loss weights (reference: cos 1.0, l2 0.1, ms 1.0). A weight of 0 skips that term.

    kd (logit distillation at kd_temperature) is our addition, 0 by default: the paper's
    student never sees the teacher's logits."""

    cos: float = 1.0
    l2: float = 0.1
    ms: float = 1.0
    norm_mode: NormMode = "distance"
    kd: float = 0.0
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cos", "l2", "ms", "kd"):
            if getattr(self, name) < 0:
                raise ValueError(f"distillation weight {name} must be >= 0, got {getattr(self, name)}")
        if self.norm_mode not in ("distance", "norm"):
            raise ValueError(f"norm_mode must be 'distance' or 'norm', got {self.norm_mode!r}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")

    @property
    def needs_teacher_blocks(self) -> bool:
        return self.cos > 0 or self.l2 > 0


@dataclass
class LossTerms:
    """Each term UNWEIGHTED and separately (so each can be logged), plus the weighted total.

    cos and l2 are summed over blocks. A term whose weight is 0 is a constant 0.0 tensor
    with no autograd graph: it was never computed.
    """

    total: Tensor
    ce: Tensor
    cos: Tensor
    l2: Tensor
    ms: Tensor
    kd: Tensor

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging, keyed by TERM_NAMES."""
        return {name: float(getattr(self, name).detach()) for name in TERM_NAMES}


def distillation_loss(
    student_logits: Tensor,
    aux_logits: Sequence[Tensor],
    student_blocks: Sequence[Tensor],
    teacher_blocks: Sequence[Tensor],
    targets: Tensor,
    mask: Tensor | None,
    weights: DistillWeights = DistillWeights(),
    teacher_logits: Tensor | None = None,
) -> LossTerms:
    """total = ce + w.cos * sum_b(1 - cos) + w.l2 * sum_b(norm term) + w.ms * sum_heads(ce)
    + w.kd * logit distillation.

    student_blocks / teacher_blocks: the paired block outputs (see slmrec.blocks), one
    [B, L, H] tensor each, shallow to deep. aux_logits: the B-1 extra heads' logits.
    Inputs of a zero-weight term are not read and may be empty (or None).
    """
    ce = next_item_ce(student_logits, targets)
    zero = torch.zeros((), device=ce.device)
    if weights.needs_teacher_blocks:
        if len(student_blocks) != len(teacher_blocks) or not student_blocks:
            raise ValueError(
                f"need the same non-zero number of student and teacher blocks, got "
                f"{len(student_blocks)} and {len(teacher_blocks)}")
    cos = zero
    if weights.cos:
        cos = torch.stack([direction_alignment(s, t, mask) for s, t in zip(student_blocks, teacher_blocks)]).sum()
    l2 = zero
    if weights.l2:
        l2 = torch.stack([norm_regularisation(s, t, mask, weights.norm_mode)
                          for s, t in zip(student_blocks, teacher_blocks)]).sum()
    ms = zero
    if weights.ms:
        if not aux_logits:
            raise ValueError(
                "weights.ms > 0 but no auxiliary head logits were given "
                "(with a single block there are no extra heads: set the ms weight to 0)")
        if student_blocks and len(aux_logits) != len(student_blocks) - 1:
            raise ValueError(
                f"expected one auxiliary head per block but the last ({len(student_blocks) - 1}), "
                f"got {len(aux_logits)}")
        ms = multiple_supervision(aux_logits, targets)
    kd = zero
    if weights.kd:
        if teacher_logits is None:
            raise ValueError("weights.kd > 0 but no teacher logits were given")
        kd = logit_distillation(student_logits, teacher_logits, targets, weights.kd_temperature)
    total = ce + weights.cos * cos + weights.l2 * l2 + weights.ms * ms + weights.kd * kd
    return LossTerms(total=total, ce=ce, cos=cos, l2=l2, ms=ms, kd=kd)
