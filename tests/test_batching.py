"""Leave-one-out split and right padding, against hand-written arrays."""
from __future__ import annotations

import numpy as np
import pytest

from slmrec.batching import eval_pair, to_arrays, train_pair


def test_train_pair_all_positions():
    # s = 1..6: train part 1..4; inputs 1,2,3 predict 2,3,4.
    inputs, targets = train_pair(np.arange(1, 7), max_len=10)
    assert inputs.tolist() == [1, 2, 3] and targets.tolist() == [2, 3, 4]
    # max_len keeps the most recent pairs.
    inputs, targets = train_pair(np.arange(1, 7), max_len=2)
    assert inputs.tolist() == [2, 3] and targets.tolist() == [3, 4]


def test_train_on_valid_adds_the_validation_target():
    # s = 1..6: validation target 5 joins the training part 1..5; the test item 6 stays out.
    inputs, targets = train_pair(np.arange(1, 7), max_len=10, train_on_valid=True)
    assert inputs.tolist() == [1, 2, 3, 4] and targets.tolist() == [2, 3, 4, 5]
    out = to_arrays([[1, 2, 3, 4], [7, 8, 9]], "train", max_len=3, train_on_valid=True)
    assert out["items"].tolist() == [[1, 2, 0], [7, 0, 0]]
    assert out["targets"].tolist() == [[2, 3, 0], [8, 0, 0]]


def test_eval_pairs():
    seq = np.array([5, 6, 7, 8, 9])
    assert [h.tolist() if hasattr(h, "tolist") else h for h in eval_pair(seq, "valid", 10)] == [[5, 6, 7], 8]
    assert [h.tolist() if hasattr(h, "tolist") else h for h in eval_pair(seq, "test", 2)] == [[7, 8], 9]


def test_to_arrays_right_pads():
    out = to_arrays([[1, 2, 3, 4], [7, 8, 9]], "train", max_len=3)
    # [7, 8, 9]: training part [7] has no (input, next) pair -> an all-padding row.
    assert out["items"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert out["targets"].tolist() == [[2, 0, 0], [0, 0, 0]]
    out = to_arrays([[1, 2, 3, 4], [7, 8, 9]], "test", max_len=3)
    assert out["items"].tolist() == [[1, 2, 3], [7, 8, 0]]
    assert out["targets"].tolist() == [4, 9]


def test_too_short_sequences_are_refused():
    with pytest.raises(ValueError, match="shorter than 3"):
        to_arrays([[1, 2]], "valid", max_len=3)
