"""Histories of item indices -> top-k item indices with a trained recommender.

The one path that online serving, offline scoring and the serving benchmark call (the
int8 parity check uses its two halves), so they cannot drift apart: the user vector is the
model's own `user_vectors` (its last item's state projected into item space, the last layer
run only at that position) and it is ranked against the model's frozen item table with the
chunked top-k (never a users x items matrix beyond one chunk).

Histories may be longer than the model's `max_len`: the model sees the most recent
`max_len` items, while `exclude_seen` removes every item of the whole history.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from slmrec.backbones import merge_lora
from slmrec.checkpoint import load_meta
from slmrec.model import SeqRecommender
from slmrec.topk import chunked_topk


def pad_histories(histories: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
    """Right-padded LongTensor [B, L] of each history's most recent `max_len` items
    (all of them when max_len is None). Empty histories are refused: the model has no
    position to read a user vector from, so callers must fall back before this."""
    rows = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    empty = [i for i, row in enumerate(rows) if row.size == 0]
    if empty:
        raise ValueError(f"histories {empty[:5]} are empty; a user vector needs at least one item")
    if max_len is not None:
        rows = [row[-max_len:] for row in rows]
    width = max((row.size for row in rows), default=0)
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : row.size] = row
    return torch.from_numpy(out)


@torch.inference_mode()
def user_vectors(model: SeqRecommender, items: torch.Tensor) -> torch.Tensor:
    """[B, item_dim] user vectors in item space from right-padded item indices [B, L]."""
    return model.user_vectors(items).float()


@torch.inference_mode()
def recommend(model: SeqRecommender, histories: Sequence[Sequence[int]], k: int,
              exclude_seen: bool = True, chunk_size: int = 65536
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores [B, k], item indices [B, k], on the CPU) for each history; empty slots
    (fewer than k items left after exclusion) hold index -1 and score -inf. Runs on the
    model's device."""
    device = model.item_table.device
    items = pad_histories(histories, model.config.max_len).to(device)
    seen = pad_histories(histories).to(device) if exclude_seen else None
    scores, indices = chunked_topk(user_vectors(model, items), model.item_table, k, seen, exclude_seen,
                                   chunk_size)
    return scores.cpu(), indices.cpu()


def check_vocabulary(directory: str | Path, num_items: int, vocabulary: str = "") -> None:
    """Refuse a saved model trained on another item vocabulary than the data it is about
    to serve: its item indices would map to the wrong original ids without any error. The
    item count catches most; the digest of the ids in index order (where the model and
    the caller both have one) also catches the same count in another order, as after
    preparing a newer log. Reads only the checkpoint's JSON, so jobs can check before
    starting any work."""
    config = load_meta(directory)["config"]
    if config["num_items"] != num_items:
        raise ValueError(f"model {directory} was trained on {config['num_items']} items but the "
                         f"prepared data has {num_items}; use the prepared data it was trained on")
    if vocabulary and config.get("vocabulary") and config["vocabulary"] != vocabulary:
        raise ValueError(f"model {directory} was trained on other items than the prepared data's "
                         f"{num_items} (same count, other ids by index: prepared again?); use the "
                         "prepared data it was trained on")


@dataclass
class Recommender:
    """A model bound to its top-k settings: `(histories, k, exclude_seen) -> (scores,
    indices)`, the callable offline scoring and serving hold."""

    model: SeqRecommender
    chunk_size: int = 65536

    def __call__(self, histories: Sequence[Sequence[int]], k: int,
                 exclude_seen: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return recommend(self.model, histories, k, exclude_seen, self.chunk_size)

    @property
    def num_items(self) -> int:
        return self.model.config.num_items

    @classmethod
    def load(cls, directory: str | Path, int8: bool = False, chunk_size: int = 65536,
             device: str | torch.device = "cpu") -> "Recommender":
        """A saved model for inference on `device`, LoRA adapters folded into their weights
        (the same scores without the adapters' extra matmuls), optionally int8-quantised
        (CPU only: torch's dynamic quantisation has no CUDA kernels)."""
        device = torch.device(device)
        if int8 and device.type != "cpu":
            raise ValueError(f"int8 models run on the CPU only, not on {device}")
        model = SeqRecommender.load(directory).eval()
        if int8:
            # Imported here: slmrec.quantize itself builds on this module.
            from slmrec.quantize import quantize_int8

            model = quantize_int8(model, inplace=True)  # merges the adapters too
        else:
            merge_lora(model)
        return cls(model.to(device), chunk_size)
