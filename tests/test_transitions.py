"""Transition-count baseline on hand-computed sequences."""
from __future__ import annotations

import math

import pytest
import torch

from slmrec.metrics import metrics_from_ranks, ranks_from_scores
from slmrec.transitions import TransitionCounts, last_item_and_target


SEQS = [[1, 2, 3, 2, 4],   # training part (validation 2 and test 4 held out): 1->2, 2->3
        [1, 2, 3, 1, 3],   # 1->2, 2->3
        [2, 1, 4, 3, 2]]   # 2->1, 1->4


def test_counts_use_the_training_part_only():
    fit = TransitionCounts.fit(SEQS, num_items=4)
    dense = fit.counts.to_dense()
    expected = torch.zeros(5, 5, dtype=torch.float64)
    expected[1, 2], expected[2, 3], expected[2, 1], expected[1, 4] = 2, 2, 1, 1
    assert torch.equal(dense, expected)
    assert fit.popularity.tolist() == [0, 1, 2, 2, 1]
    # With the validation item trained on, its transition counts too: 3->2, 3->1, 4->3.
    tov = TransitionCounts.fit(SEQS, num_items=4, train_on_valid=True).counts.to_dense()
    assert tov[3, 2] == 1 and tov[3, 1] == 1 and tov[4, 3] == 1 and tov.sum() == 9


def test_scores_rank_by_count_then_popularity():
    fit = TransitionCounts.fit(SEQS, num_items=4)
    scores = fit.scores(torch.tensor([1, 3]))
    assert scores[0, 0] == float("-inf")
    # After item 1: item 2 (count 2), then 4 (count 1), then 3 (count 0, popularity 2).
    assert scores[0, 1:].argsort(descending=True).add(1).tolist() == [2, 4, 3, 1]
    # Item 3 was never followed by anything: popularity alone (2 and 3 tie at 2; 4 and 1 at 1).
    assert scores[1, 2] == scores[1, 3] > scores[1, 1] == scores[1, 4]
    assert (scores[:, 1:] - fit.counts.to_dense()[[1, 3], 1:]).max() < 1


def test_last_item_and_target_and_metrics_end_to_end():
    fit = TransitionCounts.fit(SEQS, num_items=4)
    last, targets = last_item_and_target(SEQS)
    assert last.tolist() == [2, 1, 3] and targets.tolist() == [4, 3, 2]
    ranks = ranks_from_scores(fit.scores(last), targets)
    # user 0, after 2: items 3 (count 2) and 1 (count 1), then 2 (count 0, popularity 2)
    # beat 4 (count 0, popularity 1) -> rank 3; user 1, after 1: 2 and 4 beat 3 -> rank 2;
    # user 2, after 3 (no transitions): popularity, 3 ties with the target 2 (ties are
    # pessimistic) -> rank 1.
    assert ranks.tolist() == [3, 2, 1]
    assert metrics_from_ranks(ranks)["NDCG@5"] == pytest.approx(
        (1 / math.log2(5) + 1 / math.log2(4) + 1 / math.log2(3)) / 3)


def test_out_of_range_items_are_refused():
    with pytest.raises(ValueError, match="item indices must be in 1..3"):
        TransitionCounts.fit([[1, 5, 2, 3, 1]], num_items=3)
