"""Turn per-user item sequences into fixed-shape training and evaluation arrays.

Leave-one-out split of one user's time-ordered sequence s_1 .. s_n (the prepare stage
keeps at most max_len + 2 items):
- training: s_1 .. s_{n-2}; one causal example covering every position: inputs
  s_1 .. s_{n-3}, targets s_2 .. s_{n-2} (position t predicts the item after it);
- validation: history s_1 .. s_{n-2}, target s_{n-1};
- test: history s_1 .. s_{n-1}, target s_n.
With `train_on_valid` the training part is s_1 .. s_{n-1}: the validation item becomes a
training target, as in the generative-recommenders protocol, which holds out only the test
item (validation then measures fit, not generalisation).
Histories keep their most recent `max_len` items. All arrays are right-padded with 0,
the padding index, so the last valid position of a row is `length - 1`.

A user needs at least three items (a history item, a validation and a test target);
callers drop shorter sequences before batching and count them (`to_arrays` refuses them).
A user with exactly three items is evaluated but has no training pair: its training row
is all padding, which the loss ignores.
"""
from __future__ import annotations

from typing import Iterable, Literal, Sequence

import numpy as np

MIN_SEQUENCE_LENGTH = 3  # a history item + a validation and a test target

Split = Literal["train", "valid", "test"]


def _right_pad(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def train_pair(sequence: np.ndarray, max_len: int, train_on_valid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-item targets of one user's training part, most recent max_len."""
    train = np.asarray(sequence)[:-1 if train_on_valid else -2]
    return train[:-1][-max_len:], train[1:][-max_len:]


def eval_pair(sequence: np.ndarray, split: Literal["valid", "test"], max_len: int) -> tuple[np.ndarray, int]:
    """History (most recent max_len items) and target of one user for validation or test."""
    seq = np.asarray(sequence)
    cut = len(seq) - (2 if split == "valid" else 1)
    return seq[:cut][-max_len:], int(seq[cut])


def to_arrays(sequences: Iterable[Sequence[int]], split: Split, max_len: int,
              train_on_valid: bool = False) -> dict[str, np.ndarray]:
    """Batch of sequences -> {"items": [B, max_len] int64, "targets": ...}.

    train: targets is [B, max_len] (0 where there is no target);
    valid/test: targets is [B].
    """
    used = [np.asarray(s, dtype=np.int64) for s in sequences]
    short = [len(s) for s in used if len(s) < MIN_SEQUENCE_LENGTH]
    if short:
        raise ValueError(f"{len(short)} sequence(s) shorter than {MIN_SEQUENCE_LENGTH} items "
                         "(need a history item, a validation and a test target); filter them first")
    if split == "train":
        pairs = [train_pair(s, max_len, train_on_valid) for s in used]
        return {
            "items": _right_pad([p[0] for p in pairs], max_len),
            "targets": _right_pad([p[1] for p in pairs], max_len),
        }
    pairs_eval = [eval_pair(s, split, max_len) for s in used]
    return {
        "items": _right_pad([p[0] for p in pairs_eval], max_len),
        "targets": np.array([p[1] for p in pairs_eval], dtype=np.int64),
    }
