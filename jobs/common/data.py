"""Training and evaluation datasets from the prepare stage's output, on Ray Data.

Each split is a lazy Ray Dataset of fixed-shape int64 arrays (see slmrec.batching), so
workers stream them with `iter_torch_batches`; nothing is collected on the driver.
Users too short for the leave-one-out split (fewer than 3 items, possible only when
prepare ran with --min-user-interactions below 3) are dropped here and counted.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipelines.prepared import read_stats, sequences_dataset
from slmrec.batching import MIN_SEQUENCE_LENGTH, to_arrays


def user_seed(user_id) -> int:
    """A stable 63-bit integer per user (seeds that user's sampled negatives, whatever the
    batching or number of workers)."""
    digest = hashlib.blake2b(str(user_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _arrays_fn(split: Literal["train", "valid", "test"], max_len: int, train_on_valid: bool = False):
    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = to_arrays(batch["item_index"], split, max_len, train_on_valid)
        if split != "train":
            out["user_seed"] = np.array([user_seed(u) for u in batch["user_id"]], dtype=np.int64)
        return out
    return fn


@dataclass
class Splits:
    train: "ray.data.Dataset"
    valid: "ray.data.Dataset"
    test: "ray.data.Dataset"
    users: int
    too_short: int
    num_items: int

    def as_dict(self) -> dict[str, "ray.data.Dataset"]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def in_validation_subset(user_id, fraction: float) -> bool:
    """Whether a user belongs to the first `fraction` of users by the stable hash: the same
    subset in every epoch, run and worker."""
    return user_seed(user_id) < fraction * 2.0 ** 63


def load_splits(prepared: str, max_len: int, valid_fraction: float = 1.0, train_on_valid: bool = False) -> Splits:
    """Train/valid/test datasets; validation keeps the `valid_fraction` subset of users.
    With `train_on_valid` the training rows also hold each user's validation target."""
    import ray.data

    if not 0.0 < valid_fraction <= 1.0:
        raise ValueError(f"--valid-fraction must be in (0, 1], got {valid_fraction}")

    # Training prints its own progress lines; Ray Data's bars would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    stats = read_stats(prepared)
    sequences = sequences_dataset(prepared)
    long_enough = sequences.filter(lambda row: len(row["item_index"]) >= MIN_SEQUENCE_LENGTH)
    users = int(stats["users"])
    # One row per user: counting is cheap and makes any drop visible.
    kept = long_enough.count()
    validated = (long_enough if valid_fraction == 1.0 else
                 long_enough.filter(lambda row: in_validation_subset(row["user_id"], valid_fraction)))
    splits = {name: source.map_batches(_arrays_fn(name, max_len, train_on_valid), batch_format="numpy")
              for name, source in (("train", long_enough), ("valid", validated), ("test", long_enough))}
    # Evaluation reads its sets every epoch: materialised once (O(users x max_len) in the
    # object store, spilled to disk when large) instead of re-reading the Parquet each time.
    # A run that trains on the validation targets never validates: its set stays lazy.
    if not train_on_valid:
        splits["valid"] = splits["valid"].materialize()
    splits["test"] = splits["test"].materialize()
    return Splits(users=users, too_short=users - kept, num_items=int(stats["items"]), **splits)
