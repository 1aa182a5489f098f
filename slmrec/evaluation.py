"""Evaluation protocols over batches of (history, target) users.

Two protocols, always labelled in reports (METHOD.md): full ranking over every item
(the default; optionally with the user's history items excluded) and the paper's
sampled protocol (target + N uniform negatives outside the history the model reads,
fixed seed).
Numbers of the two are not comparable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence

import torch

from slmrec.metrics import MetricSums, full_ranking_ranks, sampled_ranks


class Ranker(Protocol):
    def user_vectors(self, items: torch.Tensor) -> torch.Tensor: ...

    def item_table(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class EvalProtocol:
    kind: Literal["full", "sampled"] = "full"
    mask_history: bool = False
    num_negatives: int = 999
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("full", "sampled"):
            raise ValueError(f"evaluation protocol must be 'full' or 'sampled', got {self.kind!r}")

    @property
    def label(self) -> str:
        """Short name used as a metric prefix: full / full_masked / sampled999."""
        if self.kind == "sampled":
            return f"sampled{self.num_negatives}"
        return "full_masked" if self.mask_history else "full"

    @property
    def description(self) -> str:
        if self.kind == "sampled":
            return (f"sampled: target + {self.num_negatives} uniform negatives outside the history items "
                    f"the model reads (its last max_len), seed {self.seed}")
        return "full ranking over all items, " + ("the history items the model reads excluded (as "
                                                  "generative-recommenders evaluates)" if self.mask_history
                                                  else "history items not masked")


def reported_protocols(num_negatives: int, seed: int) -> list[EvalProtocol]:
    """The protocols every final test is scored and reported under: full ranking with the
    history competing and with it excluded (the two conventions papers report under, and
    on ML-1M they differ by ~1.5x), then sampled. One forward pass serves all three."""
    return [EvalProtocol("full"), EvalProtocol("full", mask_history=True),
            EvalProtocol("sampled", num_negatives=num_negatives, seed=seed)]


def ranks_from_vectors(users: torch.Tensor, table: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                       protocol: EvalProtocol, user_ids: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target given the users' vectors [B, D] and the item table [V, D]."""
    if protocol.kind == "full":
        return full_ranking_ranks(users, table, targets, history_items=items if protocol.mask_history else None)

    def candidate_scores(candidates: torch.Tensor) -> torch.Tensor:
        candidates = candidates.to(users.device)
        return (users[:, None, :] * table[candidates]).sum(-1)

    return sampled_ranks(candidate_scores, targets, items, num_negatives=protocol.num_negatives,
                         seed=protocol.seed, num_items=table.shape[0] - 1, user_ids=user_ids)


def evaluate_batches(ranker: Ranker, batches: Iterable[dict[str, torch.Tensor]],
                     protocols: Sequence[EvalProtocol]) -> list[MetricSums]:
    """Metric sums per protocol over batches {"items": [B, L], "targets": [B]} (mergeable
    across workers). Each batch's user vectors are computed once for all protocols: the
    backbone's forward pass is the expensive part."""
    sums = [MetricSums() for _ in protocols]
    table = ranker.item_table().float()
    for batch in batches:
        users = ranker.user_vectors(batch["items"]).float()
        for protocol, acc in zip(protocols, sums):
            acc.add(ranks_from_vectors(users, table, batch["items"], batch["targets"], protocol,
                                       batch.get("user_seed")))
    return sums
