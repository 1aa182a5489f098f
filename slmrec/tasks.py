"""Training tasks: what one step computes, independent of the training framework.

A task owns the module being trained and turns a batch into separately reported loss
terms, and it knows how to turn histories into user vectors for ranking. The Ray Train
worker loop (jobs/common/train_worker.py) drives any task the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from slmrec.blocks import pair_blocks
from slmrec.losses import DistillWeights, LossTerms, distillation_loss
from slmrec.model import SeqRecommender
from slmrec.sasrec import SASRec


CE_ONLY = DistillWeights(cos=0.0, l2=0.0, ms=0.0)


def next_item_terms(logits: torch.Tensor, targets: torch.Tensor) -> LossTerms:
    """Plain next-item CE, reported with the same terms as distillation (others 0)."""
    return distillation_loss(logits, [], [], [], targets, None, CE_ONLY)


def with_target(targets: torch.Tensor) -> torch.Tensor:
    """Positions [B, L] whose target is an item (not padding): the only ones scored against
    the item table, so no [B, L, N] logits are spent on padding."""
    return targets != 0


class Task(Protocol):
    model: nn.Module

    def loss(self, batch: dict[str, torch.Tensor]) -> LossTerms: ...

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor: ...

    def item_table(self) -> torch.Tensor: ...

    def save(self, directory: str) -> None: ...

    def frozen_modules(self) -> list[nn.Module]:
        """Modules the loss runs but does not train (kept out of the optimizer); the worker
        places them as it places `model`."""
        ...


@dataclass
class SASRecTask:
    """Stage 0: SASRec with full-softmax CE over all items at every position."""

    model: SASRec

    def loss(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        hidden, targets = self.model(batch["items"]), batch["targets"]
        keep = with_target(targets)
        return next_item_terms(self.model.item_logits(hidden[keep]), targets[keep])

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        hidden = self.model(items)
        return SeqRecommender.last_position(hidden, items != 0)

    def item_table(self) -> torch.Tensor:
        return self.model.item_table()

    def save(self, directory: str) -> None:
        self.model.save(directory)

    def frozen_modules(self) -> list[nn.Module]:
        return []


@dataclass
class NextItemTask:
    """Stage 1: the LLM-backbone recommender (teacher) trained with next-item CE."""

    model: SeqRecommender

    def loss(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        out, targets = self.model(batch["items"]), batch["targets"]
        keep = with_target(targets)
        return next_item_terms(self.model.item_logits(out.hidden[keep]), targets[keep])

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.model.user_vectors(items)

    def item_table(self) -> torch.Tensor:
        return self.model.item_table

    def save(self, directory: str) -> None:
        self.model.save(directory)

    def frozen_modules(self) -> list[nn.Module]:
        return []


@dataclass
class DistillTask(NextItemTask):
    """Stage 2: a shallow student learns from the frozen teacher's block outputs.

    The teacher runs online in the worker under no_grad; its B block outputs are paired
    with the student's (slmrec.blocks) and the student's intermediate blocks also get
    their own score heads (multiple supervision). With a kd weight the teacher's logits
    are distilled too."""

    teacher: SeqRecommender | None = None
    weights: DistillWeights = field(default_factory=DistillWeights)
    num_blocks: int = 4

    def __post_init__(self) -> None:
        if self.teacher is None:
            raise ValueError("DistillTask needs a teacher")
        self.pairs = pair_blocks(self.teacher.depth, self.model.depth, self.num_blocks)
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def loss(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        items, targets = batch["items"], batch["targets"]
        keep = with_target(targets)
        needs_blocks = self.weights.needs_teacher_blocks
        teacher_blocks: list[torch.Tensor] = []
        teacher_logits = None
        if needs_blocks or self.weights.kd > 0:
            with torch.no_grad():
                t_out = self.teacher(items, output_layers=needs_blocks)
                if self.weights.kd > 0:
                    teacher_logits = self.teacher.item_logits(t_out.hidden[keep])
            if needs_blocks:
                teacher_blocks = [t_out.layers[t - 1] for t, _ in self.pairs]
        s_out = self.model(items, output_layers=True)
        student_blocks = [s_out.layers[s - 1] for _, s in self.pairs]
        aux_logits = []
        if self.weights.ms > 0:
            # Heads on every student block but the last, which the main score head covers.
            aux_logits = [self.model.aux_item_logits(h[keep], i) for i, h in enumerate(student_blocks[:-1])]
        return distillation_loss(
            student_logits=self.model.item_logits(s_out.hidden[keep]), aux_logits=aux_logits,
            student_blocks=student_blocks if needs_blocks else [],
            teacher_blocks=teacher_blocks, targets=targets[keep], mask=s_out.mask, weights=self.weights,
            teacher_logits=teacher_logits)
