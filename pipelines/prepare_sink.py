"""The streaming half of the prepare stage: a Ray Data sink that reads the log unit by
unit, rejects null rows and scatters the rest to user-hash partitions on disk.

Why a sink and not a Ray shuffle: the exchange we need is "all rows of a user in one
place", which a hash of user_id modulo P gives without any all-to-all shuffle. Each write
task appends its rows to one Parquet file per partition (a row group per read batch), so
its memory is one batch, whatever the log's size. Rejected-row counts come back as the
write tasks' return values, so nothing but counters reaches the driver.

Why the sink reads the Parquet itself: Ray 2.60's read_parquet bin-packs files into
128 MiB read units, so five 1M-row files became ONE read task (one core busy out of two);
read units of whole row groups, planned from the footers validation already read, give
one task per unit.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from pipelines.logs import (REJECT_REASONS, ColumnNames, LogError, LogSchema, normalize,
                            read_columns, reject_rows)


# Scratch files are written once and read once: a fast codec beats a dense one.
SCRATCH_COMPRESSION = "lz4"


def partition_dir(root: str | Path, partition: int) -> Path:
    return Path(root) / f"part-{partition:05d}"


@dataclass
class ScatterCounts:
    """What one write task saw: input rows, rejected rows per reason, rows per partition."""

    rows: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    per_partition: list[int] = field(default_factory=list)
    # The DuckDB versions that hashed users to partitions: one task per node could differ,
    # and hash() is only stable within a version.
    hash_versions: set[str] = field(default_factory=set)

    def add(self, other: "ScatterCounts") -> None:
        self.rows += other.rows
        for k, v in other.rejected.items():
            self.rejected[k] += v
        self.per_partition = [a + b for a, b in zip(self.per_partition, other.per_partition)]
        self.hash_versions |= other.hash_versions

    def check_one_hash_version(self) -> None:
        if len(self.hash_versions) > 1:
            raise RuntimeError(f"the scatter ran on DuckDB versions {sorted(self.hash_versions)}, whose "
                               "hash() differ, so one user's rows may be in two partitions; install "
                               "one version on every node (requirements.txt pins it)")


def partition_of(user_ids: pa.ChunkedArray | pa.Array, num_partitions: int) -> np.ndarray:
    """Partition number of each user id: DuckDB's hash, the same for a given id in every
    task and on every node (same DuckDB version)."""
    con = duckdb.connect(config={"threads": 1})
    try:
        ids = pa.table({"u": user_ids})
        con.register("ids", ids)
        parts = con.sql(f"SELECT (hash(u) % {num_partitions})::INTEGER AS p FROM ids").to_arrow_table()
    finally:
        con.close()
    return parts["p"].to_numpy()


class ScatterByUserSink(Datasink[ScatterCounts]):
    """Read units of the log, reject null rows, and write rows to `root/part-XXXXX/` by
    user hash."""

    def __init__(self, root: str, names: ColumnNames, schema: LogSchema,
                 min_rating: float | None, num_partitions: int, batch_rows: int = 500_000):
        self.root = root
        self.columns = read_columns(names, schema.with_rating)
        self.batch_rows = batch_rows
        self.names = names
        self.schema = schema
        self.min_rating = min_rating
        self.num_partitions = num_partitions
        self.total: ScatterCounts | None = None

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        for p in range(self.num_partitions):
            partition_dir(self.root, p).mkdir(parents=True, exist_ok=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> ScatterCounts:
        """Each input row is a read unit (pieces of (path, row_groups)); it is read in
        batches of `batch_rows`, so a task holds one batch, however big the unit.

        Retries are idempotent: files are written under a hidden temporary name (never
        matched by the `*.parquet` readers) and renamed, when the task succeeds, to a name
        fixed by the task index, which a retry of the same task shares. A killed attempt
        leaves only ignored temporary files or files its retry replaces."""
        counts = ScatterCounts(per_partition=[0] * self.num_partitions,
                               hash_versions={duckdb.__version__})
        writers: dict[int, tuple[pq.ParquetWriter, Path]] = {}
        attempt = f".w{ctx.task_idx:06d}-{uuid.uuid4().hex[:8]}.parquet.tmp"
        try:
            for path, batch in self._batches(blocks):
                counts.rows += batch.num_rows
                kept, rejected = reject_rows(self._normalize(batch, path), self.min_rating)
                for k, v in rejected.items():
                    counts.rejected[k] += v
                self._scatter(kept.select(["user_id", "item_id", "timestamp"]), writers, attempt, counts)
        except BaseException:
            for writer, tmp in writers.values():
                writer.close()
                tmp.unlink(missing_ok=True)
            raise
        for p, (writer, tmp) in writers.items():
            writer.close()
            os.replace(tmp, partition_dir(self.root, p) / f"w{ctx.task_idx:06d}.parquet")
        return counts

    def _batches(self, blocks: Iterable[Block]) -> Iterator[tuple[str, pa.Table]]:
        """(file, batch) for every piece of every unit in `blocks`, in order."""
        for block in blocks:
            for unit in BlockAccessor.for_block(block).to_arrow().to_pylist():
                for piece in unit["pieces"]:
                    path, row_groups = piece["path"], piece["row_groups"]
                    try:
                        reader = pq.ParquetFile(path)
                        for batch in reader.iter_batches(batch_size=self.batch_rows, row_groups=row_groups,
                                                         columns=self.columns):
                            yield path, pa.Table.from_batches([batch])
                    except (OSError, pa.ArrowException) as e:
                        raise LogError(f"{path}: cannot read row groups {row_groups} ({e})") from e

    def _normalize(self, batch: pa.Table, path: str) -> pa.Table:
        try:
            return normalize(batch, self.names, self.schema)
        except LogError as e:
            raise LogError(f"{path}: {e}") from e

    def _scatter(self, table: pa.Table, writers: dict[int, tuple[pq.ParquetWriter, Path]],
                 tmp_name: str, counts: ScatterCounts) -> None:
        if table.num_rows == 0:
            return
        parts = partition_of(table["user_id"], self.num_partitions)
        order = np.argsort(parts, kind="stable")
        table = table.take(pa.array(order))
        sizes = np.bincount(parts, minlength=self.num_partitions)
        start = 0
        for p, size in enumerate(sizes.tolist()):
            if size == 0:
                continue
            piece = table.slice(start, size)
            start += size
            if p not in writers:
                tmp = partition_dir(self.root, p) / tmp_name
                writers[p] = (pq.ParquetWriter(str(tmp), piece.schema,
                                               compression=SCRATCH_COMPRESSION), tmp)
            writers[p][0].write_table(piece)
            counts.per_partition[p] += size

    def on_write_complete(self, write_result: WriteResult[ScatterCounts]) -> None:
        total = ScatterCounts(per_partition=[0] * self.num_partitions)
        for one in write_result.write_returns:
            total.add(one)
        self.total = total
