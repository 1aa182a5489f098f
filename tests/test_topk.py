"""Chunked top-k equals the plain full-matrix reference; both honour the conventions
(column 0 never returned, seen items excluded on request, empty slots marked -1)."""
from __future__ import annotations

import pytest
import torch

from slmrec.topk import NO_ITEM, chunked_topk, reference_topk


def _random_case(gen: torch.Generator):
    batch = int(torch.randint(1, 6, (1,), generator=gen))
    num_items = int(torch.randint(1, 40, (1,), generator=gen))
    dim = int(torch.randint(1, 9, (1,), generator=gen))
    hist = int(torch.randint(1, 12, (1,), generator=gen))
    users = torch.randn(batch, dim, generator=gen)
    table = torch.randn(num_items + 1, dim, generator=gen)
    seen = torch.randint(0, num_items + 1, (batch, hist), generator=gen)
    k = int(torch.randint(1, num_items + 1, (1,), generator=gen))
    chunk = int(torch.randint(1, num_items + 3, (1,), generator=gen))
    return users, table, seen, k, chunk


def _check_invariants(users, table, seen, exclude, scores, indices):
    """What any valid answer must satisfy, whatever the order of ties."""
    full = users @ table.T
    for b in range(users.shape[0]):
        got = indices[b][indices[b] != NO_ITEM].tolist()
        assert 0 not in got
        assert len(got) == len(set(got))
        if exclude:
            assert not set(got) & set(seen[b].tolist())
        torch.testing.assert_close(scores[b, :len(got)], full[b, got])
        assert torch.all(scores[b, len(got):] == float("-inf"))
        assert torch.all(scores[b, :-1] >= scores[b, 1:])
        # Nothing left out (and allowed) scores higher than the last item kept.
        banned = set(got) | {0} | (set(seen[b].tolist()) if exclude else set())
        left_out = [i for i in range(table.shape[0]) if i not in banned]
        if left_out and got:
            assert full[b, left_out].max() <= scores[b, len(got) - 1] + 1e-6
        if len(got) < indices.shape[1]:
            assert not left_out


@pytest.mark.parametrize("exclude", [False, True])
def test_chunked_matches_reference_on_random_shapes(exclude):
    gen = torch.Generator().manual_seed(1234 + exclude)
    for _ in range(80):
        users, table, seen, k, chunk = _random_case(gen)
        ref_scores, ref_idx = reference_topk(users, table, k, seen, exclude)
        got_scores, got_idx = chunked_topk(users, table, k, seen, exclude, chunk_size=chunk)
        torch.testing.assert_close(got_scores, ref_scores)
        # Gaussian scores have no ties, so even the order must agree.
        assert torch.equal(got_idx, ref_idx), (k, chunk, table.shape)
        _check_invariants(users, table, seen, exclude, got_scores, got_idx)


def test_ties_keep_the_invariants():
    gen = torch.Generator().manual_seed(7)
    for _ in range(50):
        users, table, seen, k, chunk = _random_case(gen)
        # Integer-valued vectors produce many equal scores.
        users, table = users.round(), table.round()
        scores, idx = chunked_topk(users, table, k, seen, True, chunk_size=chunk)
        ref_scores, _ = reference_topk(users, table, k, seen, True)
        torch.testing.assert_close(scores, ref_scores)
        _check_invariants(users, table, seen, True, scores, idx)


def test_hand_computed_case():
    # Scores for the single user are 9 (padding row), 5, 1, 4, 3: padding scores
    # highest yet must never be returned.
    table = torch.tensor([[9.0], [5.0], [1.0], [4.0], [3.0]])
    users = torch.tensor([[1.0]])
    scores, idx = chunked_topk(users, table, 3, chunk_size=2)
    assert idx.tolist() == [[1, 3, 4]]
    assert scores.tolist() == [[5.0, 4.0, 3.0]]
    seen = torch.tensor([[1, 4, 0]])
    scores, idx = chunked_topk(users, table, 3, seen, exclude_seen=True, chunk_size=2)
    assert idx.tolist() == [[3, 2, NO_ITEM]]
    assert scores[0, :2].tolist() == [4.0, 1.0] and scores[0, 2] == float("-inf")


def test_without_exclusion_seen_items_come_back():
    table = torch.tensor([[0.0], [5.0], [1.0]])
    _, idx = chunked_topk(torch.ones(1, 1), table, 2, torch.tensor([[1]]), exclude_seen=False)
    assert idx.tolist() == [[1, 2]]


@pytest.mark.parametrize("k", [0, 5])
def test_k_out_of_range_names_k(k):
    with pytest.raises(ValueError, match="k must be in"):
        chunked_topk(torch.ones(1, 2), torch.ones(5, 2), k)


def test_dimension_mismatch_is_reported():
    with pytest.raises(ValueError, match="dim"):
        chunked_topk(torch.ones(1, 3), torch.ones(5, 2), 1)
