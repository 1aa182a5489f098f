"""Length bucketing: trimmed padding changes no result; re-dealt rows are all kept."""
from __future__ import annotations

import pytest
import torch

from slmrec.bucketing import deal_rows, length_buckets, trim_padding
from slmrec.model import build_recommender
from slmrec.tasks import NextItemTask
from tests.test_model import item_table, scratch


def _batch(rows: list[list[int]], width: int = 8) -> dict[str, torch.Tensor]:
    items = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        items[i, : len(row)] = torch.tensor(row)
    targets = torch.where(items > 0, items % 30 + 1, 0)
    return {"items": items, "targets": targets, "user_seed": torch.arange(len(rows))}


def test_trim_cuts_only_all_padding_columns():
    batch = _batch([[1, 2, 0], [3]])
    out = trim_padding(batch)
    assert out["items"].tolist() == [[1, 2], [3, 0]]
    assert out["targets"].shape == (2, 2)
    assert out["user_seed"].tolist() == [0, 1]  # 1-D tensors are left whole


def test_trim_keeps_one_column_of_an_all_padding_batch():
    assert trim_padding(_batch([[], []]))["items"].shape == (2, 1)


def test_trimmed_batch_gives_the_same_loss():
    model = build_recommender(scratch(), item_table()).eval()
    task = NextItemTask(model)
    batch = _batch([[3, 7, 1], [5, 2, 9, 4, 11], [8]])
    full, trimmed = task.loss(batch).total, task.loss(trim_padding(batch)).total
    assert trim_padding(batch)["items"].shape[1] == 5
    assert torch.allclose(full, trimmed, atol=1e-6)


def _rows(batches) -> list[tuple[int, ...]]:
    return sorted(tuple(int(x) for x in row if x) + (int(seed),)
                  for b in batches for row, seed in zip(b["items"], b["user_seed"]))


def _windows(lengths: list[int], size: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(lengths), size):
        b = _batch([list(range(1, n + 1)) for n in lengths[start:start + size]])
        b["user_seed"] = torch.arange(start, start + len(b["items"]))
        batches.append(b)
    return batches


LENGTHS = [8, 1, 2, 7, 1, 8, 2, 1, 3, 3, 6]  # batches of 2: longest rows 8, 7, 8, 2, 3, 6


def test_buckets_keep_every_row_and_batch_size():
    batches = _windows(LENGTHS, 2)
    out = list(length_buckets(batches, window=3, seed=0))
    assert sorted(len(b["items"]) for b in out) == sorted(len(b["items"]) for b in batches)
    assert _rows(out) == _rows(batches)


def test_buckets_pad_each_batch_to_its_own_longest_row():
    out = list(length_buckets(_windows(LENGTHS, 2), window=3))
    # Without a seed each window comes out shortest first: window 1 holds lengths
    # 8,1,2,7,1,8 -> (1,1) (2,7) (8,8); window 2 holds 2,1,3,3,6 -> (1,2) (3,3) (6).
    assert [b["items"].shape[1] for b in out] == [1, 7, 8, 2, 3, 6]
    padded_positions = sum(b["items"].numel() for b in out)
    assert padded_positions == 2 * (1 + 7 + 8 + 2 + 3) + 6 < 2 * (8 + 7 + 8 + 2 + 3) + 6


def test_seeded_order_is_reproducible_and_shuffled():
    batches = _windows(list(range(1, 9)) * 4, 2)
    first = [b["user_seed"].tolist() for b in length_buckets(batches, window=8, seed=3)]
    again = [b["user_seed"].tolist() for b in length_buckets(batches, window=8, seed=3)]
    other = [b["user_seed"].tolist() for b in length_buckets(batches, window=8, seed=4)]
    unseeded = [b["user_seed"].tolist() for b in length_buckets(batches, window=8)]
    assert first == again
    assert first != other and first != unseeded


def test_window_of_one_only_trims():
    batches = _windows(LENGTHS, 2)
    out = list(length_buckets(batches, window=1, seed=0))
    assert [b["user_seed"].tolist() for b in out] == [b["user_seed"].tolist() for b in batches]
    assert [b["items"].shape[1] for b in out] == [8, 7, 8, 2, 3, 6]


def test_empty_rows_are_spread_over_the_batches():
    # Rows 1 (5 items) and 4 (3 items) are non-empty; 4 empty rows over batches of 2, 2, 2.
    chunks = deal_rows(torch.tensor([0, 5, 0, 0, 3, 0]), [2, 2, 2])
    assert [c.tolist() for c in chunks] == [[4, 0], [1, 2], [3, 5]]
    with pytest.raises(ValueError, match="add up"):
        deal_rows(torch.tensor([1, 2, 3]), [2, 2])
    # Half the rows empty (users with no training pair): no batch may end up without a target.
    lengths = [0, 4] * 8 + [0, 0, 2, 6] * 4
    out = list(length_buckets(_windows(lengths, 4), window=len(lengths) // 4, seed=0))
    assert all((b["items"] != 0).any() for b in out)
    assert _rows(out) == _rows(_windows(lengths, 4))
