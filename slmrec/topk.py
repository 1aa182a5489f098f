"""Top-k items for a batch of user vectors, over the whole item vocabulary, in chunks.

Scoring is a dot product of each user vector with every row of the frozen item table.
With millions of items a users x items score matrix does not fit, so `chunked_topk`
walks the table in column chunks and keeps a running top-k: memory is
O(users x (chunk + k)) whatever the vocabulary size. `reference_topk` is the plain
version (one full matrix) that the chunked one is tested against.

Conventions shared by both:
  - row 0 of the item table is padding and is never returned;
  - `seen` is a LongTensor [B, L] of item indices right-padded with 0 (the same layout
    as the model input); with `exclude_seen` those items get score -inf;
  - when fewer than k items are left to recommend (tiny vocabularies, long histories)
    the missing slots hold index -1 and score -inf, so callers can drop them; they are
    never filled with padding or already-seen items.
"""
from __future__ import annotations

import torch

NO_ITEM = -1
"""Index of an empty top-k slot (fewer than k candidates were left)."""


def _check(user_vectors: torch.Tensor, item_table: torch.Tensor, k: int,
           seen: torch.Tensor | None) -> None:
    if user_vectors.dim() != 2 or item_table.dim() != 2:
        raise ValueError(
            f"user_vectors must be [B, D] and item_table [N+1, D]; got "
            f"{tuple(user_vectors.shape)} and {tuple(item_table.shape)}")
    if user_vectors.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"user vector dim {user_vectors.shape[1]} != item table dim {item_table.shape[1]}")
    num_items = item_table.shape[0] - 1
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be in [1, {num_items}] (the number of items), got {k}")
    if seen is not None and (seen.dim() != 2 or seen.shape[0] != user_vectors.shape[0]):
        raise ValueError(
            f"seen must be [B, L] with B = {user_vectors.shape[0]}, got {tuple(seen.shape)}")


def _mark_empty(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots whose score is -inf are masked items picked only to fill k: report them empty."""
    return scores, indices.masked_fill(scores == float("-inf"), NO_ITEM)


def reference_topk(user_vectors: torch.Tensor, item_table: torch.Tensor, k: int,
                   seen: torch.Tensor | None = None, exclude_seen: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores [B, k], item indices [B, k]) from the full score matrix.

    The definition the chunked version must match; fine for tests and small vocabularies.
    """
    _check(user_vectors, item_table, k, seen)
    scores = user_vectors @ item_table.T
    scores[:, 0] = float("-inf")
    if exclude_seen and seen is not None:
        # Padding (0) in `seen` hits column 0, which is masked anyway.
        scores.scatter_(1, seen, float("-inf"))
    return _mark_empty(*torch.topk(scores, k, dim=1))


def chunked_topk(user_vectors: torch.Tensor, item_table: torch.Tensor, k: int,
                 seen: torch.Tensor | None = None, exclude_seen: bool = False,
                 chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores [B, k], item indices [B, k]) scoring `chunk_size` items at a time.

    Equal to `reference_topk` up to the order of tied scores.
    """
    _check(user_vectors, item_table, k, seen)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch = user_vectors.shape[0]
    best_scores = user_vectors.new_full((batch, 0), float("-inf"))
    best_indices = torch.zeros((batch, 0), dtype=torch.long, device=user_vectors.device)
    mask_seen = exclude_seen and seen is not None
    if mask_seen:
        rows = torch.arange(batch, device=seen.device).unsqueeze(1).expand_as(seen)
    for start in range(0, item_table.shape[0], chunk_size):
        stop = min(start + chunk_size, item_table.shape[0])
        scores = user_vectors @ item_table[start:stop].T
        if start == 0:
            scores[:, 0] = float("-inf")
        if mask_seen:
            inside = (seen >= start) & (seen < stop)
            scores[rows[inside], seen[inside] - start] = float("-inf")
        chunk_k = min(k, stop - start)
        chunk_scores, chunk_indices = torch.topk(scores, chunk_k, dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_indices = torch.cat([best_indices, chunk_indices + start], dim=1)
        keep = min(k, merged_scores.shape[1])
        best_scores, order = torch.topk(merged_scores, keep, dim=1)
        best_indices = merged_indices.gather(1, order)
    return _mark_empty(best_scores, best_indices)
