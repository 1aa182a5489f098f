"""Ranking metrics for next-item prediction: HR@k, NDCG@k and MRR from target ranks.

Conventions (shared by the whole library): item index 0 is padding and real items are
1..N, so score tensors have N+1 columns and column 0 never competes. A rank is 0-based:
rank 0 means the target scored above every competing item.

Ties are PESSIMISTIC: a competing item whose score equals the target's counts as ranked
above it. A model that gives every item the same score therefore gets rank = number of
competitors (metrics ~0), never a perfect rank 0; optimistic tie-breaking would reward a
collapsed model, and a random tie-break would make results depend on the seed.

Two protocols, which must always be labelled because their numbers are not comparable:
- full ranking (`ranks_from_scores`, `full_ranking_ranks`): the target against all items,
  optionally excluding the user's history;
- sampled (`sampled_ranks`): the target against `num_negatives` items sampled uniformly
  from those outside the user's history (the SLMRec paper uses 999).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# Multiplier mixing a user key into the sampling seed, so per-user streams differ.
_SEED_STRIDE = 1_000_003


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Metric keys in a fixed order: HR@k for each k, NDCG@k for each k > 1, then MRR.

    NDCG@1 equals HR@1 (one slot, discount 1), so it is not reported twice.
    """
    _check_ks(ks)
    return [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks if k > 1] + ["MRR"]


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {list(ks)}")


def _check_targets(targets: Tensor, num_items: int) -> None:
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [B], got shape {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        raise ValueError(
            f"targets must be real items in 1..{num_items} (0 is padding), "
            f"got values in [{int(targets.min())}, {int(targets.max())}]")


def ranks_from_scores(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based rank of each target among the candidate items of its row.

    scores [B, N+1]; targets [B] in 1..N; exclude: optional bool [B, N+1], True for items
    that must not compete (e.g. the user's history). Column 0 never competes and the
    target itself is never excluded. Ties are pessimistic (see module docstring).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N+1], got shape {tuple(scores.shape)}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but targets has {targets.shape[0]}")
    _check_targets(targets, scores.shape[1] - 1)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    target_scores = scores.gather(1, targets[:, None])
    competes = scores >= target_scores
    competes[:, 0] = False
    if exclude is not None:
        if exclude.shape != scores.shape or exclude.dtype != torch.bool:
            raise ValueError(
                f"exclude must be a bool mask shaped like scores {tuple(scores.shape)}, "
                f"got {exclude.dtype} {tuple(exclude.shape)}")
        competes &= ~exclude
    competes.scatter_(1, targets[:, None], False)
    return competes.sum(dim=1)


def full_ranking_ranks(
    user_repr: Tensor,
    item_table: Tensor,
    targets: Tensor,
    history_mask: Tensor | None = None,
    history_items: Tensor | None = None,
    chunk_size: int = 65536,
) -> Tensor:
    """Full-ranking ranks computed chunk by chunk over the item table.

    Scores are dot products user_repr [B, D] @ item_table[N+1, D].T, but only one
    [B, chunk_size] block exists at a time, so million-item vocabularies fit in memory.
    The user's history can be excluded either as a bool mask [B, N+1] (`history_mask`) or,
    without any B x N tensor, as item indices [B, L] right-padded with 0 (`history_items`).

    Equals `ranks_from_scores(user_repr @ item_table.T, ...)` whenever both paths compute
    bit-identical scores (always when scores are exactly representable; with general
    floats the target's score here comes from a row-wise dot product, so a near-tie may
    resolve differently by a rounding step, more so under TF32/bf16 matmuls on GPUs).
    """
    if user_repr.dim() != 2 or item_table.dim() != 2 or user_repr.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"user_repr must be [B, D] and item_table [N+1, D] with the same D, got "
            f"{tuple(user_repr.shape)} and {tuple(item_table.shape)}")
    if user_repr.shape[0] != targets.shape[0]:
        raise ValueError(f"user_repr has {user_repr.shape[0]} rows but targets has {targets.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if history_mask is not None and history_items is not None:
        raise ValueError("give the history either as history_mask or as history_items, not both")
    num_items = item_table.shape[0] - 1
    _check_targets(targets, num_items)
    if history_mask is not None and (
            history_mask.dtype != torch.bool or history_mask.shape != (user_repr.shape[0], num_items + 1)):
        raise ValueError(
            f"history_mask must be bool [B, N+1] = {(user_repr.shape[0], num_items + 1)}, "
            f"got {history_mask.dtype} {tuple(history_mask.shape)}")
    if history_items is not None:
        if history_items.dim() != 2 or history_items.shape[0] != user_repr.shape[0]:
            raise ValueError(f"history_items must be [B, L], got {tuple(history_items.shape)}")
        # The target itself never leaves the competition; 0 marks "no item" below.
        history_items = torch.where(history_items == targets[:, None], 0, history_items)

    target_scores = (user_repr * item_table[targets]).sum(dim=1, keepdim=True)
    if torch.isnan(target_scores).any():
        raise ValueError("target scores contain NaN; ranks would be meaningless")
    ranks = torch.zeros(user_repr.shape[0], dtype=torch.long, device=user_repr.device)
    for start in range(1, num_items + 1, chunk_size):
        stop = min(start + chunk_size, num_items + 1)
        competes = user_repr @ item_table[start:stop].T >= target_scores
        in_chunk = (targets >= start) & (targets < stop)
        rows = in_chunk.nonzero().squeeze(1)
        competes[rows, targets[rows] - start] = False
        if history_mask is not None:
            competes &= ~history_mask[:, start:stop]
        if history_items is not None:
            inside = (history_items >= start) & (history_items < stop)
            r, c = inside.nonzero(as_tuple=True)
            competes[r, history_items[r, c] - start] = False
        ranks += competes.sum(dim=1)
    return ranks


def _forbidden_items(history: Tensor | Sequence, row: int, target: int) -> Tensor:
    """Item indices row `row` may not sample: its history (padding 0 dropped) and target."""
    if isinstance(history, Tensor) and history.dtype == torch.bool:
        items = history[row].nonzero().squeeze(1).cpu()
    else:
        items = torch.as_tensor(history[row], dtype=torch.long).reshape(-1).cpu()
    items = torch.cat([items[items > 0], torch.tensor([target], dtype=torch.long)])
    return torch.unique(items)


def _sample_row(forbidden: Tensor, num_items: int, k: int, gen: torch.Generator) -> Tensor:
    """Up to k distinct items from 1..num_items outside `forbidden`, uniformly at random."""
    forbidden = forbidden[(forbidden >= 1) & (forbidden <= num_items)]
    available = num_items - forbidden.numel()
    if available <= 2 * k:
        # Dense case: enumerate what is left (cheap, since N is then about k + history).
        allowed = torch.ones(num_items + 1, dtype=torch.bool)
        allowed[0] = False
        allowed[forbidden] = False
        pool = allowed.nonzero().squeeze(1)
        return pool[torch.randperm(pool.numel(), generator=gen)[:k]]
    # Sparse case: drawing with replacement and keeping the first occurrence of each
    # allowed item gives a uniform sample without replacement, in O(k) not O(N).
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < k:
        draws = torch.randint(1, num_items + 1, (2 * k,), generator=gen)
        draws = torch.cat([picked, draws[~torch.isin(draws, forbidden)]])
        uniq, inverse = torch.unique(draws, return_inverse=True)
        first = torch.full((uniq.numel(),), draws.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
        picked = uniq[first.argsort()]
    return picked[:k]


def sample_negatives(
    targets: Tensor,
    history: Tensor | Sequence,
    num_items: int,
    num_negatives: int = 999,
    seed: int = 0,
    user_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Negatives for the sampled protocol: (items [B, K] long, valid [B, K] bool).

    Each row gets `num_negatives` distinct items drawn uniformly WITHOUT replacement from
    1..num_items minus the row's history and target. When fewer items are available, the
    row gets all of them; the remaining slots hold 0 with valid=False.

    history: a bool mask [B, N+1], or per-row item indices (a list of arrays / tensors, or
    a [B, L] tensor right-padded with 0). Reproducible for a fixed seed: without
    `user_ids` one torch.Generator runs through the rows in order (same inputs in the same
    order -> same negatives); with `user_ids` [B] each row's generator is seeded from
    (seed, user id), so a user's negatives do not depend on batching or sharding.
    Sampling runs on the CPU; the returned tensors are CPU tensors.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    _check_targets(targets, num_items)
    if len(history) != targets.shape[0]:
        raise ValueError(f"history has {len(history)} rows but targets has {targets.shape[0]}")
    if user_ids is not None and user_ids.shape != targets.shape:
        raise ValueError(f"user_ids must be [B] like targets, got {tuple(user_ids.shape)}")
    targets = targets.cpu()
    user_ids = None if user_ids is None else user_ids.cpu()
    batch = targets.shape[0]
    items = torch.zeros(batch, num_negatives, dtype=torch.long)
    valid = torch.zeros(batch, num_negatives, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for row in range(batch):
        if user_ids is not None:
            gen.manual_seed(seed * _SEED_STRIDE + int(user_ids[row]))
        forbidden = _forbidden_items(history, row, int(targets[row]))
        picked = _sample_row(forbidden, num_items, num_negatives, gen)
        items[row, : picked.numel()] = picked
        valid[row, : picked.numel()] = True
    return items, valid


def sampled_ranks(
    scores: Tensor | Callable[[Tensor], Tensor],
    targets: Tensor,
    history: Tensor | Sequence,
    num_negatives: int = 999,
    seed: int = 0,
    num_items: int | None = None,
    user_ids: Tensor | None = None,
) -> Tensor:
    """0-based rank of each target among itself + sampled negatives (see `sample_negatives`).

    scores: either a full score matrix [B, N+1], or a callable taking candidate items
    [B, 1+K] on the CPU (column 0 = the target, then the negatives; padding slots hold
    item 0, and their scores are ignored) and returning their scores [B, 1+K]; with a callable, `num_items` is required. If a row
    has fewer than `num_negatives` items available it is ranked among all of them, so its
    rank is bounded by that smaller number. Ties are pessimistic.
    """
    if isinstance(scores, Tensor):
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, N+1], got shape {tuple(scores.shape)}")
        if num_items is not None and num_items != scores.shape[1] - 1:
            raise ValueError(f"num_items={num_items} but scores has {scores.shape[1]} columns (N+1)")
        num_items = scores.shape[1] - 1
    elif num_items is None:
        raise ValueError("num_items is required when scores is a callable")
    negatives, valid = sample_negatives(targets, history, num_items, num_negatives, seed, user_ids)
    candidates = torch.cat([targets[:, None].cpu(), negatives], dim=1)
    if isinstance(scores, Tensor):
        cand_scores = scores.gather(1, candidates.to(scores.device))
    else:
        cand_scores = scores(candidates)
        if cand_scores.shape != candidates.shape:
            raise ValueError(
                f"scores callable returned shape {tuple(cand_scores.shape)}, "
                f"expected {tuple(candidates.shape)}")
    if torch.isnan(cand_scores).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    valid = valid.to(cand_scores.device)
    return ((cand_scores[:, 1:] >= cand_scores[:, :1]) & valid).sum(dim=1)


def _per_rank_values(ranks: Tensor, ks: Sequence[int]) -> Tensor:
    """[B, len(metric_names(ks))] per-user metric values, float64."""
    r = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(r + 2.0)
    cols = [(r < k).to(torch.float64) for k in ks]
    cols += [torch.where(r < k, gain, 0.0) for k in ks if k > 1]
    cols.append(1.0 / (r + 1.0))
    return torch.stack(cols, dim=1)


def _check_ranks(ranks: Tensor) -> None:
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D [B], got shape {tuple(ranks.shape)}")
    if ranks.numel() and int(ranks.min()) < 0:
        raise ValueError("ranks must be >= 0 (0-based)")


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k = mean(rank < k); NDCG@k = mean(1/log2(rank+2) if rank < k else 0);
    MRR = mean(1/(rank+1)). One relevant item per user, so the ideal DCG is 1."""
    sums = MetricSums(ks)
    sums.add(ranks)
    return sums.result()


@dataclass(eq=False)
class MetricSums:
    """Running sums of per-user metric values, so evaluation can stream over batches and
    workers: `add` per batch, then `merge` objects or all-reduce `as_tensor()` (a flat
    float64 tensor: the sums in `metric_names(ks)` order, then the count) and rebuild with
    `from_tensor`. float64 keeps counts exact up to 2**53 users."""

    ks: tuple[int, ...] = DEFAULT_KS
    sums: Tensor | None = None
    count: int = 0

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        names = metric_names(self.ks)
        if self.sums is None:
            self.sums = torch.zeros(len(names), dtype=torch.float64)
        elif self.sums.shape != (len(names),):
            raise ValueError(f"sums must have {len(names)} entries for ks={self.ks}, got {tuple(self.sums.shape)}")

    @property
    def names(self) -> list[str]:
        return metric_names(self.ks)

    def add(self, ranks: Tensor) -> None:
        _check_ranks(ranks)
        self.sums += _per_rank_values(ranks.detach().cpu(), self.ks).sum(dim=0)
        self.count += ranks.numel()

    def merge(self, other: "MetricSums") -> None:
        if other.ks != self.ks:
            raise ValueError(f"cannot merge metric sums with ks={other.ks} into ks={self.ks}")
        self.sums += other.sums
        self.count += other.count

    def as_tensor(self) -> Tensor:
        return torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64)])

    @classmethod
    def from_tensor(cls, flat: Tensor, ks: Sequence[int] = DEFAULT_KS) -> "MetricSums":
        flat = flat.detach().cpu().to(torch.float64)
        count = float(flat[-1])
        if count < 0 or count != math.floor(count):
            raise ValueError(f"the last entry must be a non-negative integer count, got {count}")
        return cls(tuple(ks), flat[:-1].clone(), int(count))

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no ranks were added; metrics of zero users are undefined")
        means = (self.sums / self.count).tolist()
        return dict(zip(self.names, means))

