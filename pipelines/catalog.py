"""The prepared data as serving and scoring need it: item index <-> original id,
popularity, and (for serving) each user's history.

Models speak item indices (1..N, 0 = padding); users of the recommender speak the
original item ids of the logs. Original ids may be integers or strings; lookups key on
`str(id)` so that a JSON client may send 42 or "42" for the same item, while answers
always carry the id with its original type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.prepared import SEQUENCES_DIR, load_item_vocab


@dataclass
class ItemCatalog:
    """item_ids[i - 1] is the original id of item index i; counts[i] its interaction
    count in the prepared data (counts[0] = 0 for padding)."""

    item_ids: pa.Array
    counts: np.ndarray
    _index_of: dict[str, int] | None = field(default=None, repr=False)
    _by_popularity: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_prepared(cls, path: str | Path) -> "ItemCatalog":
        vocab = load_item_vocab(path)
        indices = vocab.column("item_index").to_numpy()
        expected = np.arange(1, len(vocab) + 1)
        if not np.array_equal(indices, expected):
            raise ValueError(
                f"{path}: item_index must run 1..{len(vocab)} without gaps; the item "
                "vocabulary does not match the prepare stage's layout")
        counts = np.concatenate([[0], vocab.column("count").to_numpy()]).astype(np.int64)
        return cls(vocab.column("item_id").combine_chunks(), counts)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def ids_of(self, indices: np.ndarray) -> pa.Array:
        """Original ids of item indices (each in 1..N)."""
        return self.item_ids.take(pa.array(np.asarray(indices, dtype=np.int64) - 1))

    def index_of(self, item_ids: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """(indices of the known ids in order, the unknown ids in order)."""
        if self._index_of is None:
            self._index_of = {str(v): i + 1 for i, v in enumerate(self.item_ids.to_pylist())}
        known, unknown = [], []
        for item in item_ids:
            index = self._index_of.get(str(item))
            if index is None:
                unknown.append(item)
            else:
                known.append(index)
        return known, unknown

    def most_popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, counts) of the k most interacted-with items, most popular
        first; ties go to the lower index so the answer is deterministic."""
        if self._by_popularity is None:
            # Stable sort on -count keeps ties in index order; drop padding (index 0).
            self._by_popularity = np.argsort(-self.counts[1:], kind="stable") + 1
        top = self._by_popularity[:k]
        return top, self.counts[top]


class UserHistories:
    """str(user_id) -> the user's whole kept sequence (item indices), for serving.

    Sequences stay in two flat arrays (values and offsets, as Arrow stores them) instead
    of one Python list per user, so a replica holding millions of users pays a few bytes
    per item plus one dict entry per user."""

    def __init__(self, user_ids: Sequence[Any], sequences: pa.ListArray):
        self._row = {str(u): i for i, u in enumerate(user_ids)}
        if len(self._row) != len(user_ids):
            raise ValueError("user ids are not unique once turned into strings")
        # A sliced array's offsets still count from its parent's first value; flatten()
        # starts at this slice's first value.
        offsets = sequences.offsets.to_numpy()
        self._offsets = offsets - offsets[0]
        self._values = sequences.flatten().to_numpy()

    @classmethod
    def from_prepared(cls, path: str | Path) -> "UserHistories":
        table = pq.read_table(Path(path) / SEQUENCES_DIR, columns=["user_id", "item_index"])
        return cls(table.column("user_id").to_pylist(),
                   table.column("item_index").combine_chunks())

    def __len__(self) -> int:
        return len(self._row)

    def get(self, user_id: Any) -> np.ndarray | None:
        row = self._row.get(str(user_id))
        if row is None:
            return None
        return self._values[self._offsets[row]:self._offsets[row + 1]]
