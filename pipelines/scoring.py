"""Offline scoring: top-k items for every user of a prepared dataset, on Ray Data.

    sequences (Parquet) --map_batches(TopKScorer, actor pool)--> (user_id, items, scores)
    --> Parquet

Each actor builds its recommender once (model loading is the expensive part) and then
scores batches of users; the top-k runs over the item table in chunks, so memory per
actor is O(batch x chunk), whatever the number of items. The pipeline knows nothing of
models: it gets a `load_recommender` callable that returns a `Recommender`, i.e.
`(histories of item indices, k, exclude_seen) -> (scores [B, k], indices [B, k])` with
index -1 for empty slots (slmrec.recommend follows this contract).

Output rows: user_id (as in the prepared data), items (ORIGINAL item ids, best first),
scores (float32, same order). A user gets fewer than k items only when fewer than k
items are left after excluding their history.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_dataset

from pipelines.catalog import ItemCatalog
from pipelines.prepared import read_stats, sequences_dataset
from pipelines.staged_output import staged_output
from slmrec.checkpoint import atomic_write_json

# Written last into a finished scores directory: settings and the user count. The "_"
# keeps it out of Parquet readers' way (pyarrow, Spark and Ray Data skip such files).
SUMMARY_FILE = "_summary.json"

if TYPE_CHECKING:
    import ray.data


class Recommender(Protocol):
    def __call__(self, histories: Sequence[Sequence[int]], k: int,
                 exclude_seen: bool) -> tuple[Any, Any]: ...


class TopKScorer:
    """Ray Data actor: one recommender per actor, one call per batch of users."""

    def __init__(self, load_recommender: Callable[[], Recommender], catalog: ItemCatalog,
                 k: int, exclude_seen: bool):
        self.recommender = load_recommender()
        self.catalog = catalog
        self.k = k
        self.exclude_seen = exclude_seen

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("item_index").to_pylist()
        empty = [u for u, h in zip(batch.column("user_id").to_pylist(), histories) if not h]
        if empty:
            raise ValueError(f"users {empty[:5]} have empty sequences; the prepare stage "
                             "never writes those, so the input is not a prepared dataset")
        scores, indices = self.recommender(histories, self.k, self.exclude_seen)
        scores, indices = np.asarray(scores, dtype=np.float32), np.asarray(indices)
        keep = indices >= 1
        lengths = keep.sum(axis=1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
        items = pa.ListArray.from_arrays(offsets, self.catalog.ids_of(indices[keep]))
        item_scores = pa.ListArray.from_arrays(offsets, pa.array(scores[keep], pa.float32()))
        return pa.table({"user_id": batch.column("user_id"), "items": items,
                         "scores": item_scores})


def score_users(sequences: "ray.data.Dataset", load_recommender: Callable[[], Recommender],
                catalog: ItemCatalog, k: int, exclude_seen: bool = True,
                batch_size: int = 256, num_actors: int = 1,
                num_cpus_per_actor: float = 1.0, num_gpus_per_actor: float = 0.0) -> "ray.data.Dataset":
    """Lazily scored dataset (user_id, items, scores) from (user_id, item_index, ...)."""
    import ray.data

    if not 1 <= k <= catalog.num_items:
        raise ValueError(f"k must be in [1, {catalog.num_items}] (the number of items), got {k}")
    if batch_size < 1 or num_actors < 1:
        raise ValueError(f"batch_size and num_actors must be >= 1, got {batch_size}, {num_actors}")
    return sequences.select_columns(["user_id", "item_index"]).map_batches(
        TopKScorer,
        fn_constructor_kwargs={"load_recommender": load_recommender, "catalog": catalog,
                               "k": k, "exclude_seen": exclude_seen},
        batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=num_cpus_per_actor,
        num_gpus=num_gpus_per_actor)


def score_prepared(prepared: str | Path, output: str | Path,
                   load_recommender: Callable[[], Recommender], k: int,
                   exclude_seen: bool = True, batch_size: int = 256, num_actors: int = 1,
                   num_cpus_per_actor: float = 1.0, num_gpus_per_actor: float = 0.0,
                   summary: dict[str, Any] | None = None) -> int:
    """Score every user of a prepared directory into Parquet files under `output`, with
    `summary` (plus the user count) as _summary.json; returns the number of users written.
    `output` appears only once every user is written, so a killed run leaves no partial
    output that would pass for a finished one."""
    catalog = ItemCatalog.from_prepared(prepared)
    expected = read_stats(prepared)["users"]
    with staged_output(output) as tmp:
        scored = score_users(sequences_dataset(prepared), load_recommender, catalog, k,
                             exclude_seen, batch_size, num_actors, num_cpus_per_actor, num_gpus_per_actor)
        # Streamed straight to Parquet: the scored users are never all in memory at once.
        scored.write_parquet(str(tmp))
        users = pa_dataset.dataset(str(tmp), format="parquet").count_rows()
        if users != expected:
            raise RuntimeError(f"scored {users} users but {prepared} holds {expected}")
        atomic_write_json(tmp / SUMMARY_FILE, {**(summary or {}), "users": users})
    return users
