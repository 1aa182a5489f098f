"""Per-partition kernels of the prepare stage, in DuckDB.

Each kernel works on ONE user-hash partition (every row of a user is in the same
partition), so deduplication, the per-user k-core test, ordering and truncation are
exact locally. Only item counts are global; the driver sums them (see prepare.py).

DuckDB runs with a memory limit and a spill directory, so a kernel's memory is bounded by
settings, not by the partition's size. No Ray in here: the kernels are plain functions,
tested directly and wrapped as Ray tasks by the orchestrator.
"""
from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


TIE_ORDERS = ("hash", "item_id")


def order_within_user(tie_order: str, alias: str = "") -> str:
    """SQL ORDER BY terms for one user's rows: by timestamp, and for rows with the same
    timestamp by `tie_order`:
    - "hash": md5 of (user_id, item_id), a pseudo-random order drawn per user. A fixed
      order of items (by id, title, or any hash of the item alone) leaks: on ML-1M, where
      53% of consecutive ratings share a second, the same pair of items then always comes
      in the same order, and a model learns "what is rated after X in the same second";
      first-order transition counts score test NDCG@10 0.1175 with item_id (titles) against
      0.0853 with this order (bench/tie_order_leak.py; README, "Two corrections");
    - "item_id": by item id (the order of our runs before 2026-11-30)."""
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie order must be one of {TIE_ORDERS}, got {tie_order!r}")
    a = f"{alias}." if alias else ""
    tie = (f"md5(CAST({a}user_id AS VARCHAR) || chr(31) || CAST({a}item_id AS VARCHAR))"
           if tie_order == "hash" else f"{a}item_id")
    return f"{a}timestamp, {tie}"


@dataclass(frozen=True)
class KernelSettings:
    """Resources one kernel may use."""

    threads: int = 1
    memory_limit_mb: int = 2048
    spill_dir: str | None = None


@contextmanager
def connection(settings: KernelSettings) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection under `settings`, spilling to a directory of its own: tasks of
    every node share --scratch-dir, and DuckDB names its spill files by process id (1.x:
    by nothing at all), which is unique on one machine only."""
    config = {"threads": settings.threads, "memory_limit": f"{settings.memory_limit_mb}MB",
              # Deterministic results do not need insertion order; dropping it saves memory.
              "preserve_insertion_order": False}
    spill = Path(settings.spill_dir) / uuid.uuid4().hex if settings.spill_dir else None
    if spill:
        spill.mkdir(parents=True)
        config["temp_directory"] = str(spill)
    con = duckdb.connect(config=config)
    try:
        yield con
    finally:
        con.close()
        if spill:
            shutil.rmtree(spill, ignore_errors=True)


def _literal(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def _scan(path: str) -> str:
    return f"read_parquet({_literal(path)}, hive_partitioning = false)"


def dedup(partition_glob: str, base_path: str, settings: KernelSettings) -> tuple[int, int]:
    """Keep each (user, item) pair once, with its earliest timestamp; write the result to
    `base_path`. Returns (rows read, rows written): the caller checks the first against the
    rows the scatter wrote, so a scratch file this task cannot see (storage that is not
    shared, a lagging network filesystem) fails the run instead of passing as duplicates.
    Only the three key columns survive."""
    with connection(settings) as con:
        (read,) = con.execute(f"SELECT count(*) FROM {_scan(partition_glob)}").fetchone()
        (written,) = con.execute(
            f"COPY (SELECT user_id, item_id, min(timestamp) AS timestamp "
            f"FROM {_scan(partition_glob)} GROUP BY user_id, item_id) "
            f"TO {_literal(base_path)} (FORMAT parquet, COMPRESSION lz4)").fetchone()
    return int(read), int(written)


def item_counts(base_path: str, keep_items: pa.Table | None, min_user: int,
                settings: KernelSettings) -> pa.Table:
    """Item counts of the partition's current k-core state: rows of `keep_items` only
    (all rows when None), then users with at least `min_user` of those rows.

    The state is recomputed from the deduplicated base each round instead of being
    rewritten: item removals only shrink user counts, so "filter items, then drop small
    users" from the base gives the same rows as applying every earlier round in turn."""
    with connection(settings) as con:
        return con.sql(
            f"WITH s AS ({_state_rows(base_path, keep_items, con)}), "
            "u AS (SELECT user_id FROM s GROUP BY user_id HAVING count(*) >= $min_user) "
            "SELECT item_id, count(*)::BIGINT AS count FROM s SEMI JOIN u USING (user_id) "
            "GROUP BY item_id", params={"min_user": min_user}).to_arrow_table()



def sum_item_counts(*parts: pa.Table) -> pa.Table:
    """Item counts of several partitions (item_id, count), summed per item."""
    return (pa.concat_tables(parts).group_by("item_id").aggregate([("count", "sum")])
            .rename_columns(["item_id", "count"]))

def _state_rows(base_path: str, keep_items: pa.Table | None,
                con: duckdb.DuckDBPyConnection) -> str:
    if keep_items is None:
        return f"SELECT user_id, item_id, timestamp FROM {_scan(base_path)}"
    con.register("keep_items", keep_items)
    return (f"SELECT user_id, item_id, timestamp FROM {_scan(base_path)} "
            "SEMI JOIN keep_items USING (item_id)")


@dataclass(frozen=True)
class SequenceCounts:
    users: int = 0
    interactions: int = 0
    kcore_rows: int = 0

    def __add__(self, other: "SequenceCounts") -> "SequenceCounts":
        return SequenceCounts(self.users + other.users, self.interactions + other.interactions,
                              self.kcore_rows + other.kcore_rows)


def sequences(base_path: str, vocab: pa.Table, min_user: int, keep_last: int,
              out_path: str, user_type: pa.DataType, settings: KernelSettings,
              tie_order: str = "hash", batch_rows: int = 1_000_000) -> SequenceCounts:
    """Write one row per k-core user: the last `keep_last` items in timestamp order (ties
    by `tie_order`, see `order_within_user`) as item indices, with their timestamps.

    `vocab` (item_id, item_index) is the final k-core's item set, so joining with it is
    the last item filter; users below `min_user` are then dropped. DuckDB sorts the rows
    by user, then within the user, and streams them out `batch_rows` at a time; the last
    user of a batch waits for the next one (its rows may continue there), so memory is a
    batch plus the largest user's rows, not the partition. Cutting and list-building are
    array arithmetic on user run boundaries (measured ~2x faster here than DuckDB's
    ordered list aggregate or a row_number window)."""
    schema = pa.schema([("user_id", user_type), ("item_index", pa.list_(pa.int32())),
                        ("timestamp", pa.list_(pa.int64()))])
    counts = SequenceCounts()
    with connection(settings) as con, pq.ParquetWriter(out_path, schema) as writer:
        con.register("vocab", vocab)
        reader = con.sql(
            f"SELECT b.user_id, b.timestamp, v.item_index FROM {_scan(base_path)} b "
            f"JOIN vocab v USING (item_id) ORDER BY b.user_id, {order_within_user(tie_order, 'b')}"
        ).to_arrow_reader(batch_size=batch_rows)
        pending: pa.Table | None = None  # the rows of one user, who may go on
        for batch in reader:
            rows = pa.Table.from_batches([batch])
            if rows.num_rows == 0:
                continue
            last = rows["user_id"][-1]
            tail = int(pc.sum(pc.equal(rows["user_id"], last)).as_py())
            if tail == rows.num_rows and pending is not None and pending["user_id"][0] == last:
                pending = pa.concat_tables([pending, rows])  # one user across whole batches
                continue
            done = rows.slice(0, rows.num_rows - tail)
            if pending is not None:
                done = pa.concat_tables([pending, done])
            pending = rows.slice(rows.num_rows - tail)
            counts += _cut_users(done, min_user, keep_last, schema, writer)
        if pending is not None:
            counts += _cut_users(pending, min_user, keep_last, schema, writer)
    return counts


def _cut_users(rows: pa.Table, min_user: int, keep_last: int, schema: pa.Schema,
               writer: pq.ParquetWriter) -> SequenceCounts:
    """Write the sequences of whole users (rows sorted by user, then in order)."""
    n = rows.num_rows
    if n == 0:
        return SequenceCounts()
    users = rows["user_id"].combine_chunks()
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(users.slice(1), users.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(first)
    lengths = np.diff(np.append(starts, n))
    kept_user = lengths >= min_user
    # 1 for a user's most recent row, 2 for the one before, ...
    rank_from_end = np.repeat(starts + lengths, lengths) - np.arange(n)
    take = pa.array(np.flatnonzero((rank_from_end <= keep_last) & np.repeat(kept_user, lengths)))
    offsets = pa.array(np.concatenate([np.zeros(1, np.int64), np.cumsum(np.minimum(lengths[kept_user], keep_last))]),
                       pa.int32())
    table = pa.table({
        "user_id": users.take(pa.array(starts[kept_user])).cast(schema.field("user_id").type),
        "item_index": pa.ListArray.from_arrays(
            offsets, rows["item_index"].take(take).combine_chunks().cast(pa.int32())),
        "timestamp": pa.ListArray.from_arrays(
            offsets, rows["timestamp"].take(take).combine_chunks().cast(pa.int64())),
    }, schema=schema)
    if table.num_rows:
        writer.write_table(table)
    return SequenceCounts(users=table.num_rows, interactions=len(take),
                          kcore_rows=int(lengths[kept_user].sum()))
