"""Which teacher layer is compared with which student layer during distillation.

SLMRec splits both networks into B blocks of equal depth and aligns the output of each
block: teacher depths (M/B)*i and student depths (N/B)*i for i = 1..B, where M and N are
the numbers of decoder layers. For an 8-layer teacher and a 4-layer student with B = 4
the pairs are (2,1), (4,2), (6,3), (8,4).

Depth convention (1-based): depth d is the output of decoder layer d, i.e. the residual
stream after layer d. The last pair (d = M for the teacher, d = N for the student) is the
final representation, which is the POST-norm output (the user representation the score
head sees). This module only computes indices; the model is responsible for returning
per-layer outputs in which entry d-1 is the output of layer d and the last entry is
taken after the final norm.
"""
from __future__ import annotations


def block_depths(num_layers: int, num_blocks: int) -> list[int]:
    """Depths (1-based) ending each of `num_blocks` equal blocks of a `num_layers` stack.

    Raises ValueError when the blocks cannot be equal: uneven blocks would silently weight
    some layers more than others, which the method does not define.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_blocks > num_layers:
        raise ValueError(
            f"num_blocks ({num_blocks}) cannot exceed num_layers ({num_layers}): "
            "every block needs at least one layer")
    if num_layers % num_blocks != 0:
        raise ValueError(
            f"num_layers ({num_layers}) is not divisible by num_blocks ({num_blocks}); "
            "choose a block count that divides the depth")
    step = num_layers // num_blocks
    return [step * i for i in range(1, num_blocks + 1)]


def pair_blocks(teacher_layers: int, student_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """(teacher_depth, student_depth) pairs, 1-based, one per block, shallow to deep.

    The student must not be deeper than the teacher: distillation compresses depth, and a
    deeper student would pair several student layers with one teacher layer.
    """
    if student_layers > teacher_layers:
        raise ValueError(
            f"student_layers ({student_layers}) is deeper than teacher_layers "
            f"({teacher_layers}); the student must have at most as many layers as the teacher")
    try:
        teacher = block_depths(teacher_layers, num_blocks)
    except ValueError as err:
        raise ValueError(f"teacher: {err}") from None
    try:
        student = block_depths(student_layers, num_blocks)
    except ValueError as err:
        raise ValueError(f"student: {err}") from None
    return list(zip(teacher, student))
