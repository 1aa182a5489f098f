"""bench/bucket_weights.py: the weight of a position under per-batch mean losses, by hand."""
from __future__ import annotations

import pytest
import torch

from bench.bucket_weights import epoch_batches, position_weights, quarter_stats


def test_a_position_weighs_one_over_its_batchs_positions():
    lengths = torch.tensor([1, 1, 3, 3])
    mixed = position_weights(lengths, [torch.tensor([0, 2]), torch.tensor([1, 3])])
    assert mixed.tolist() == pytest.approx([0.25, 0.25, 0.25, 0.25])
    sorted_ = position_weights(lengths, [torch.tensor([0, 1]), torch.tensor([2, 3])])
    assert sorted_.tolist() == pytest.approx([0.5, 0.5, 1 / 6, 1 / 6])
    stats = quarter_stats(lengths, sorted_)
    # Shortest quarter = row 0 (1 position of weight 1/2), longest = row 3 (3 of 1/6).
    assert stats["weight_ratio"] == pytest.approx(3.0)
    assert stats["objective_share"] == pytest.approx(0.5 / 2.0)  # each batch contributes 1 in all
    assert stats["position_share"] == pytest.approx(1 / 8)


def test_bucketing_deals_the_same_rows_into_batches_of_the_same_size():
    lengths = torch.arange(40) % 7
    shuffled, bucketed = epoch_batches(40, 4, 3, lengths, seed=1)
    assert [len(b) for b in bucketed] == [len(b) for b in shuffled] == [4] * 10
    assert sorted(torch.cat(bucketed).tolist()) == sorted(torch.cat(shuffled).tolist())
