"""Scores of user vectors against an item table, with the padding column masked.

Shared by the recommender and SASRec so both follow one convention: column 0 (padding)
is -inf, so it never wins an argmax, never takes probability mass in a softmax and is
never ranked.
"""
from __future__ import annotations

import torch


def score_items(vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., D] x [N+1, D] -> [..., N+1] dot products, column 0 = -inf."""
    scores = vectors @ table.to(vectors.dtype).T
    padding = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    padding[0] = True
    return scores.masked_fill(padding, float("-inf"))
