"""Block pairing of teacher and student layer depths (1-based, last = post-norm output)."""
from __future__ import annotations

import pytest

from slmrec.blocks import block_depths, pair_blocks


def test_block_depths():
    # 8 layers / 4 blocks -> step 2 -> 2, 4, 6, 8;  6 / 3 -> 2, 4, 6;  4 / 1 -> 4
    assert block_depths(8, 4) == [2, 4, 6, 8]
    assert block_depths(6, 3) == [2, 4, 6]
    assert block_depths(4, 1) == [4]
    assert block_depths(4, 4) == [1, 2, 3, 4]


def test_pair_blocks_reference_setting():
    assert pair_blocks(8, 4, 4) == [(2, 1), (4, 2), (6, 3), (8, 4)]
    # 8 -> 2 with 2 blocks: teacher 4, 8 with student 1, 2
    assert pair_blocks(8, 2, 2) == [(4, 1), (8, 2)]


@pytest.mark.parametrize("layers, blocks, message", [
    (8, 3, "not divisible"),
    (4, 0, ">= 1"),
    (2, 4, "cannot exceed"),
    (0, 1, "num_layers must be >= 1"),
])
def test_block_depths_errors(layers, blocks, message):
    with pytest.raises(ValueError, match=message):
        block_depths(layers, blocks)


def test_student_deeper_than_teacher_names_both():
    with pytest.raises(ValueError, match=r"student_layers \(8\).*teacher_layers \(4\)"):
        pair_blocks(4, 8, 4)


def test_pairing_error_says_which_side():
    # teacher 8 divides by 4, student 6 does not
    with pytest.raises(ValueError, match=r"^student: num_layers \(6\)"):
        pair_blocks(8, 6, 4)
    with pytest.raises(ValueError, match=r"^teacher: num_layers \(9\)"):
        pair_blocks(9, 4, 2)
