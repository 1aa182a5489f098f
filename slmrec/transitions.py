"""First-order transition counts: the next item scored by how often it followed the user's
last item in the training data (popularity breaks the ties, so a last item never seen
before still ranks by popularity).

Not a model this project trains, but a yardstick that needs no training: it learns only
item-to-item order, so where it does well the data's order is very predictable, which is
how the same-timestamp leak of a fixed tie order shows (bench/tie_order_leak.py). Counts
are a sparse [N+1, N+1] matrix, so the memory is O(transitions), not O(N^2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from slmrec.batching import eval_pair, train_pair


@dataclass(frozen=True)
class TransitionCounts:
    counts: torch.Tensor  # sparse COO [N+1, N+1]: counts[a, b] = times b followed a
    popularity: torch.Tensor  # [N+1] float64: times each item was a training target

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], num_items: int,
            train_on_valid: bool = False) -> "TransitionCounts":
        """Count every consecutive pair of each user's training part (the split of
        slmrec.batching: the test item, and the validation item unless train_on_valid,
        are held out)."""
        prev, nxt = [], []
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)
            inputs, targets = train_pair(seq, len(seq), train_on_valid)
            prev.append(inputs)
            nxt.append(targets)
        a = torch.from_numpy(np.concatenate(prev)) if prev else torch.zeros(0, dtype=torch.long)
        b = torch.from_numpy(np.concatenate(nxt)) if nxt else torch.zeros(0, dtype=torch.long)
        if len(a) and (min(a.min(), b.min()) < 1 or max(a.max(), b.max()) > num_items):
            raise ValueError(f"item indices must be in 1..{num_items}")
        counts = torch.sparse_coo_tensor(torch.stack([a, b]), torch.ones(len(a), dtype=torch.float64),
                                         (num_items + 1, num_items + 1),
                                         check_invariants=True).coalesce()
        popularity = torch.bincount(b, minlength=num_items + 1).to(torch.float64)
        return cls(counts, popularity)

    def scores(self, last_items: torch.Tensor) -> torch.Tensor:
        """[B] last items -> [B, N+1] scores: transition count + popularity / (1 + total
        popularity), so popularity only orders items with equal counts; column 0 = -inf."""
        rows = torch.index_select(self.counts, 0, last_items).to_dense()
        scores = rows + self.popularity / (1.0 + self.popularity.sum())
        scores[:, 0] = float("-inf")
        return scores


def last_item_and_target(sequences: Iterable[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's last history item and test target."""
    pairs = [eval_pair(np.asarray(s), "test", 1) for s in sequences]
    return (torch.tensor([int(h[-1]) for h, _ in pairs], dtype=torch.long),
            torch.tensor([t for _, t in pairs], dtype=torch.long))
