"""Ranking metrics against hand-computed values (column 0 = padding, ranks 0-based)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slmrec.metrics import (
    MetricSums,
    full_ranking_ranks,
    metric_names,
    metrics_from_ranks,
    ranks_from_scores,
    sample_negatives,
    sampled_ranks,
)


def test_rank_ignores_padding_column_and_counts_higher_items():
    # items 1..4 score 0.1, 0.5, 0.3, 0.9; target 2 (0.5): only item 4 (0.9) is higher.
    # Column 0 (padding) scores 9 but never competes.
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9]])
    assert ranks_from_scores(scores, torch.tensor([2])).tolist() == [1]


def test_ties_are_pessimistic():
    # target 2 scores 0.5; items 1 and 3 also score 0.5 -> both count as above -> rank 2.
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.1]])
    assert ranks_from_scores(scores, torch.tensor([2])).tolist() == [2]


def test_constant_model_scores_worst_not_best():
    # 4 items, all equal: every target has 3 tied competitors -> rank 3 -> HR@1 = 0, MRR = 1/4.
    scores = torch.zeros(3, 5)
    ranks = ranks_from_scores(scores, torch.tensor([1, 2, 4]))
    assert ranks.tolist() == [3, 3, 3]
    m = metrics_from_ranks(ranks)
    assert m["HR@1"] == 0.0 and m["MRR"] == pytest.approx(0.25)


def test_exclude_removes_competitors_but_never_the_target():
    # target 3 (0.5); exclude items 1 and 3: item 1 (0.9) no longer competes, the target
    # stays; item 2 (0.8) is above, item 4 (0.1) below -> rank 1.
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.5, 0.1]])
    exclude = torch.tensor([[False, True, False, True, False]])
    assert ranks_from_scores(scores, torch.tensor([3]), exclude).tolist() == [1]


@pytest.mark.parametrize("bad", [0, 5])
def test_target_outside_real_items_is_an_error(bad):
    with pytest.raises(ValueError, match="1..4"):
        ranks_from_scores(torch.zeros(1, 5), torch.tensor([bad]))


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]))


RANKS = torch.tensor([0, 1, 4, 9, 20])
# HR@1  = 1/5 = 0.2;  HR@5 = 3/5 (ranks 0,1,4);  HR@10 = 4/5 (0,1,4,9)
# NDCG@5  = (1/log2(2) + 1/log2(3) + 1/log2(6)) / 5 = (1 + 0.6309297536 + 0.3868528072) / 5
# NDCG@10 = (that + 1/log2(11) = 0.2890648263) / 5
# MRR     = (1 + 1/2 + 1/5 + 1/10 + 1/21) / 5 = 1.8476190476 / 5
EXPECTED = {
    "HR@1": 0.2, "HR@5": 0.6, "HR@10": 0.8,
    "NDCG@5": 2.0177825608 / 5, "NDCG@10": 2.3068473871 / 5,
    "MRR": 1.8476190476 / 5,
}


def test_metrics_from_ranks_hand_computed():
    m = metrics_from_ranks(RANKS)
    assert list(m) == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR"]
    for key, value in EXPECTED.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key


def test_metric_sums_merge_and_flat_tensor_round_trip():
    a, b = MetricSums(), MetricSums()
    a.add(RANKS[:2])
    b.add(RANKS[2:])
    # what an all-reduce(SUM) of the flat tensors produces
    reduced = MetricSums.from_tensor(a.as_tensor() + b.as_tensor())
    a.merge(b)
    assert a.count == reduced.count == 5
    assert a.as_tensor().shape == (len(metric_names()) + 1,)
    for m in (a.result(), reduced.result()):
        for key, value in EXPECTED.items():
            assert m[key] == pytest.approx(value, abs=1e-9), key


def test_metric_sums_empty_and_mismatched_are_errors():
    with pytest.raises(ValueError, match="no ranks"):
        MetricSums().result()
    with pytest.raises(ValueError, match="ks"):
        MetricSums((1, 5)).merge(MetricSums((1, 10)))


def _history_mask(items: torch.Tensor, num_items: int) -> torch.Tensor:
    mask = torch.zeros(items.shape[0], num_items + 1, dtype=torch.bool)
    mask.scatter_(1, items, True)
    mask[:, 0] = False
    return mask


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 1000])
def test_full_ranking_in_chunks_equals_full_matrix(chunk_size):
    g = torch.Generator().manual_seed(0)
    # Small integers: every score is exact in float32 and ties are frequent.
    user = torch.randint(-3, 4, (6, 4), generator=g).float()
    table = torch.randint(-3, 4, (23, 4), generator=g).float()
    targets = torch.randint(1, 23, (6,), generator=g)
    hist = torch.randint(0, 23, (6, 5), generator=g)  # 0 = padding
    hist[0, 0] = targets[0]  # a target inside its own history must still be ranked
    full = user @ table.T
    mask = _history_mask(hist, 22)
    assert torch.equal(full_ranking_ranks(user, table, targets, chunk_size=chunk_size),
                       ranks_from_scores(full, targets))
    expected = ranks_from_scores(full, targets, mask)
    assert torch.equal(full_ranking_ranks(user, table, targets, history_mask=mask, chunk_size=chunk_size), expected)
    assert torch.equal(full_ranking_ranks(user, table, targets, history_items=hist, chunk_size=chunk_size), expected)


def test_full_ranking_matches_on_random_floats():
    g = torch.Generator().manual_seed(1)
    user, table = torch.randn(16, 8, generator=g), torch.randn(101, 8, generator=g)
    targets = torch.randint(1, 101, (16,), generator=g)
    assert torch.equal(full_ranking_ranks(user, table, targets, chunk_size=13),
                       ranks_from_scores(user @ table.T, targets))


def test_sampled_uses_all_available_items_when_too_few():
    # N = 5, history {1}, target 3: available negatives are 2, 4, 5 (only 3 < 999).
    # Scores 0.2, 0.4, 0.5 vs target 0.3 -> items 4 and 5 above -> rank 2.
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([3])
    assert sampled_ranks(scores, targets, [[1]], num_negatives=999, seed=0).tolist() == [2]
    negatives, valid = sample_negatives(targets, [[1]], num_items=5, num_negatives=999)
    assert sorted(negatives[valid].tolist()) == [2, 4, 5]
    assert valid.sum() == 3 and negatives[~valid].eq(0).all()


def test_sampled_ties_are_pessimistic():
    # every candidate scores 1.0: the target is below all 3 available negatives.
    scores = torch.ones(1, 6)
    assert sampled_ranks(scores, torch.tensor([3]), [[1]], num_negatives=10).tolist() == [3]


@pytest.mark.parametrize("num_items", [50, 25])  # 50: rejection path; 25: enumeration path
def test_negatives_are_distinct_outside_history_and_reproducible(num_items):
    targets = torch.tensor([1, 7, 20])
    history = [np.array([2, 3, 4, 5, 6, 7]), np.array([1, 8]), np.array([], dtype=np.int64)]
    negs, valid = sample_negatives(targets, history, num_items, num_negatives=10, seed=3)
    assert valid.all()
    for row in range(3):
        got = negs[row].tolist()
        assert len(set(got)) == 10
        assert all(1 <= i <= num_items for i in got)
        assert not set(got) & (set(history[row].tolist()) | {int(targets[row])})
    again, _ = sample_negatives(targets, history, num_items, num_negatives=10, seed=3)
    other, _ = sample_negatives(targets, history, num_items, num_negatives=10, seed=4)
    assert torch.equal(negs, again)
    assert not torch.equal(negs, other)


def test_history_formats_give_identical_negatives():
    targets = torch.tensor([4, 9])
    lists = [[1, 2, 3], [5]]
    padded = torch.tensor([[1, 2, 3], [5, 0, 0]])
    mask = _history_mask(padded, 40)
    results = [sample_negatives(targets, h, 40, num_negatives=8, seed=11)[0] for h in (lists, padded, mask)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("num_negatives", [5, 10])  # 18 available: 5 -> rejection, 10 -> enumeration
def test_negatives_are_uniform(num_negatives):
    # target 1, history {2}: 18 allowed items (3..20), each expected 2000*k/18 times.
    rows = 2000
    negs, _ = sample_negatives(torch.ones(rows, dtype=torch.long), [[2]] * rows, 20,
                               num_negatives=num_negatives, seed=0)
    counts = torch.bincount(negs.flatten(), minlength=21)
    assert counts[:3].sum() == 0
    expected = rows * num_negatives / 18
    assert ((counts[3:] - expected).abs() < 0.15 * expected).all(), counts.tolist()


def test_user_ids_make_negatives_independent_of_batching():
    history = [[1], [2], [3]]
    a, _ = sample_negatives(torch.tensor([5, 6, 7]), history, 100, 10, seed=2, user_ids=torch.tensor([10, 11, 12]))
    b, _ = sample_negatives(torch.tensor([7]), history[2:], 100, 10, seed=2, user_ids=torch.tensor([12]))
    assert torch.equal(a[2], b[0])


def test_sampled_with_callable_equals_score_matrix():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 31, generator=g)
    targets = torch.tensor([1, 5, 9, 30])
    history = [[2, 3], [], [30], [1]]
    calls = []

    def score_fn(candidates):
        calls.append(candidates.shape)
        return scores.gather(1, candidates)

    from_fn = sampled_ranks(score_fn, targets, history, num_negatives=12, seed=1, num_items=30)
    from_matrix = sampled_ranks(scores, targets, history, num_negatives=12, seed=1)
    assert calls == [(4, 13)]
    assert torch.equal(from_fn, from_matrix)
    with pytest.raises(ValueError, match="num_items"):
        sampled_ranks(score_fn, targets, history)
