"""The prepare stage: Parquet interaction logs -> per-user sequences, item vocabulary, stats.

Rules, in order (each row that does not reach the output is counted under one of them):
 1. rows with a null user_id, item_id or timestamp (or, with --min-rating, a null or
    lower rating) are rejected, counted by reason;
 2. duplicate (user, item) pairs keep their earliest occurrence;
 3. iterative k-core: users with < min_user and items with < min_item interactions are
    removed until none is left (the result is the unique largest such subset, so it
    does not depend on the order of removals);
 4. each user's items are ordered by timestamp, same-timestamp items by a hash of
    (user_id, item_id) (--tie-order; see prepare_kernels.order_within_user);
 5. the most recent max_len + 2 per user are kept (the last two are the validation and
    test targets), the older ones counted as truncated;
 6. items get indices 1..N (0 is padding) by descending k-core count, ties by item_id,
    so the same input always gives the same vocabulary and popular items come first.
Hence input_rows = rejected + duplicates_removed + filtered_out + truncated + interactions.

How it scales (measured choices, see bench/prepare_vs_duckdb.py and ENVIRONMENT.md):
 - Ray Data streams the log once through `ScatterByUserSink`, which rejects null rows and
   writes every row to partition hash(user_id) % P on scratch disk. No shuffle operator,
   no groupby/map_groups (both measured far slower here), nothing collected on the driver.
 - One Ray task per partition deduplicates with DuckDB (memory-limited, spilling).
 - k-core rounds: each partition task returns its item counts (O(items)), tasks sum them
   in a tree of fan-in SUM_FAN_IN, and the driver broadcasts the surviving item set; users
   are partition-local, so their test is exact inside the task. The per-round state is
   recomputed from the deduplicated base, so rounds read but never rewrite the data.
 - A last task per partition orders, truncates, maps item ids to indices and writes the
   sequences. P = ceil(rows / rows_per_partition), so per-task memory is set by settings.
Everything is written under a temporary sibling of the output and renamed into place at the
end; on failure the temporary directory is removed. On a multi-node cluster, --output (and
--scratch-dir) must be on a filesystem all nodes share.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import prepare_kernels as kernels
from pipelines.logs import (REJECT_REASONS, ColumnNames, LogError, LogSchema, check_local_path,
                            read_units, resolve_inputs, validate)
from pipelines.prepare_sink import ScatterByUserSink, partition_dir
from pipelines.prepared import ITEM_INDEX_ORDER, ITEMS_DIR, SEQUENCES_DIR, STATS_FILE
from pipelines.staged_output import staged_output
from slmrec.config import field

# Partitions' item counts summed per task in the k-core rounds.
SUM_FAN_IN = 16


@dataclass
class PrepareConfig:
    """Settings of the prepare job (every field is a `jobs/prepare.py` flag)."""

    input: str = field(help="Parquet log: a file, a directory (searched for *.parquet) or a glob")
    output: str = field(help="output directory (sequences/, items/, stats.json)")
    min_user_interactions: int = field(5, help="k-core: keep users with at least this many interactions")
    min_item_interactions: int = field(5, help="k-core: keep items with at least this many interactions")
    max_len: int = field(50, help="keep the most recent max_len + 2 interactions per user "
                                  "(+2: validation and test targets)")
    min_rating: float | None = field(None, help="reject rows whose rating is below this, or "
                                                "missing (null or NaN: counted as null_rating); "
                                                "the paper uses 3; off when unset")
    user_column: str = field("user_id", help="name of the user id column in the input")
    item_column: str = field("item_id", help="name of the item id column in the input")
    timestamp_column: str = field("timestamp", help="name of the timestamp column (integer or Parquet timestamp)")
    rating_column: str = field("rating", help="name of the rating column (read only with --min-rating)")
    num_partitions: int = field(0, help="user-hash partitions; 0 = ceil(input rows / rows-per-partition)")
    rows_per_partition: int = field(2_000_000, help="target rows per partition when num-partitions is 0; "
                                                    "bounds each task's data")
    read_batch_rows: int = field(1_000_000, help="rows per read unit and per read batch of the "
                                                 "streaming pass; bounds its memory")
    task_memory_mb: int = field(2048, help="memory per partition task: DuckDB's limit (it spills beyond) "
                                           "and the Ray memory reserved, which caps concurrency")
    task_threads: int = field(1, help="CPUs (DuckDB threads) per partition task")
    scratch_dir: str | None = field(None, help="where intermediate partitions go; default: inside "
                                               "the temporary output directory")
    tie_order: Literal["hash", "item_id"] = field(
        "hash", help="order of one user's items with the same timestamp: hash = pseudo-random "
                     "per user (md5 of user and item id); item_id = by item id, which leaks "
                     "(a fixed order of co-rated items is learnable)")
    overwrite: bool = field(False, help="replace an existing output directory")

    def __post_init__(self) -> None:
        for name in ("min_user_interactions", "min_item_interactions", "max_len",
                     "rows_per_partition", "read_batch_rows", "task_memory_mb", "task_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tie_order not in kernels.TIE_ORDERS:
            raise ValueError(f"--tie-order must be one of {kernels.TIE_ORDERS}, got {self.tie_order!r}")
        if self.num_partitions < 0:
            raise ValueError(f"--num-partitions must be >= 0, got {self.num_partitions}")
        columns = [self.user_column, self.item_column, self.timestamp_column] + (
            [self.rating_column] if self.min_rating is not None else [])
        if len(set(columns)) < len(columns):
            raise ValueError(f"the user, item, timestamp (and rating) columns must be distinct, "
                             f"got {columns}")

    @property
    def columns(self) -> ColumnNames:
        return ColumnNames(self.user_column, self.item_column, self.timestamp_column, self.rating_column)


def preflight(config: PrepareConfig) -> LogSchema:
    """Everything that can be checked before Ray starts: the input files and their
    footers, and an output that would be clobbered. Raises LogError / FileExistsError."""
    for path in (config.output, config.scratch_dir):
        if path:
            check_local_path(path)
    files = resolve_inputs(config.input)
    schema = validate(files, config.columns, with_rating=config.min_rating is not None)
    out = Path(config.output).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.overwrite:
        raise FileExistsError(f"{out}: output exists and is not an empty directory (use --overwrite)")
    inside = [f for f in files if Path(f).is_relative_to(out)]
    if inside:
        raise LogError(f"{inside[0]}: an input file lies inside the output directory {out}, "
                       "which the run replaces")
    return schema


def run_prepare(config: PrepareConfig, schema: LogSchema | None = None) -> dict[str, Any]:
    """Run the stage on the connected Ray cluster; return the stats written to stats.json.
    `schema` is preflight's result when the caller already ran it."""
    schema = schema or preflight(config)
    # Absolute: the tasks that write these may run on other nodes, in other folders.
    with staged_output(config.output) as tmp:
        scratch = (Path(config.scratch_dir).absolute() / tmp.name if config.scratch_dir
                   else tmp / "_scratch")
        try:
            return _run(config, schema, tmp, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class SettingsError(ValueError):
    """Settings the cluster cannot run; the message names the flags."""


def check_task_fits(config: PrepareConfig) -> None:
    """A partition task asks one node for --task-threads CPUs and --task-memory-mb; where no
    node has both, Ray keeps it pending forever, so the job would hang, not fail."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    memory = config.task_memory_mb * 2**20
    if any(r.get("CPU", 0) >= config.task_threads and r.get("memory", 0) >= memory for r in nodes):
        return
    cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    mib = max((r.get("memory", 0) for r in nodes), default=0) / 2**20
    raise SettingsError(f"no node can run a partition task of --task-threads {config.task_threads} and "
                        f"--task-memory-mb {config.task_memory_mb} (the largest node has {cpus:g} CPUs, "
                        f"{mib:.0f} MiB of Ray memory); lower them")


def _num_partitions(config: PrepareConfig, schema: LogSchema) -> int:
    if config.num_partitions:
        return config.num_partitions
    return max(1, math.ceil(schema.num_rows / config.rows_per_partition))


def _run(config: PrepareConfig, schema: LogSchema, tmp: Path, scratch: Path) -> dict[str, Any]:
    import ray
    import ray.data

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    num_parts = _num_partitions(config, schema)
    settings = kernels.KernelSettings(config.task_threads, config.task_memory_mb,
                                      str(scratch / "spill"))
    task = {"num_cpus": config.task_threads, "memory": config.task_memory_mb * 2**20}
    check_task_fits(config)

    # 1. Stream the log once: reject null rows, scatter rows by user hash.
    sink = ScatterByUserSink(str(scratch / "parts"), config.columns, schema,
                             config.min_rating, num_parts, config.read_batch_rows)
    units = read_units(schema, config.read_batch_rows)
    # One read unit per block, so Ray Data runs one write task per unit, in parallel.
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds.write_datasink(sink)
    scatter = sink.total
    if scatter is None or scatter.rows != schema.num_rows:
        raise RuntimeError(f"read {scatter.rows if scatter else 0} rows but the Parquet footers "
                           f"promise {schema.num_rows}; the input changed while reading?")
    scatter.check_one_hash_version()
    timings["scatter_s"] = time.perf_counter() - t0
    live = [p for p in range(num_parts) if scatter.per_partition[p] > 0]
    if not live:
        raise LogError(f"every row was rejected: {scatter.rejected}")
    base = {p: str(scratch / f"base-{p:05d}.parquet") for p in live}

    # 2. Deduplicate each partition (keep the earliest occurrence of each user-item pair).
    t = time.perf_counter()
    dedup = ray.remote(kernels.dedup).options(**task)
    read_written = ray.get([dedup.remote(str(partition_dir(scratch / "parts", p) / "*.parquet"),
                                         base[p], settings) for p in live])
    check_partitions_read(scratch / "parts", live, [read for read, _ in read_written],
                          scatter.per_partition)
    dedup_rows = [written for _, written in read_written]
    rows_valid = sum(scatter.per_partition)
    duplicates_removed = rows_valid - sum(dedup_rows)
    timings["dedup_s"] = time.perf_counter() - t

    # 3. Iterative k-core: global item counts, partition-local user test.
    t = time.perf_counter()
    count = ray.remote(kernels.item_counts).options(**task)
    add = ray.remote(kernels.sum_item_counts).options(**task)

    def count_round(keep: pa.Table | None) -> pa.Table:
        keep_ref = ray.put(keep)
        refs = [count.remote(base[p], keep_ref, config.min_user_interactions, settings) for p in live]
        # A tree of summing tasks: the driver adds at most SUM_FAN_IN tables of O(items)
        # rows, not one per partition in turn.
        while len(refs) > SUM_FAN_IN:
            refs = [add.remote(*refs[i:i + SUM_FAN_IN]) for i in range(0, len(refs), SUM_FAN_IN)]
        return kernels.sum_item_counts(*ray.get(refs))

    counts, rounds = kcore_items(count_round, config.min_item_interactions)
    if counts.num_rows == 0:
        raise LogError(f"the k-core is empty: no user has >= {config.min_user_interactions} "
                       f"interactions on items with >= {config.min_item_interactions}")
    timings["kcore_s"] = time.perf_counter() - t

    # 4. Vocabulary, then ordered and truncated sequences per partition.
    t = time.perf_counter()
    vocab = item_vocabulary(counts)
    (tmp / ITEMS_DIR).mkdir(parents=True)
    pq.write_table(vocab.set_column(0, "item_id", vocab["item_id"].cast(schema.item_type)),
                   str(tmp / ITEMS_DIR / "part-00000.parquet"))
    (tmp / SEQUENCES_DIR).mkdir(parents=True)
    vocab_ref = ray.put(vocab.select(["item_id", "item_index"]))
    build = ray.remote(kernels.sequences).options(**task)
    results = ray.get([build.remote(base[p], vocab_ref, config.min_user_interactions,
                                    config.max_len + 2,
                                    str(tmp / SEQUENCES_DIR / f"part-{p:05d}.parquet"),
                                    schema.user_type, settings, config.tie_order,
                                    config.read_batch_rows) for p in live])
    timings["sequences_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    kcore_rows = sum(r.kcore_rows for r in results)
    interactions = sum(r.interactions for r in results)
    stats = {
        "input_rows": schema.num_rows,
        "rejected": {k: scatter.rejected[k] for k in REJECT_REASONS},
        "duplicates_removed": duplicates_removed,
        "filtered_out": sum(dedup_rows) - kcore_rows,
        "truncated": kcore_rows - interactions,
        "users": sum(r.users for r in results),
        "items": vocab.num_rows,
        "interactions": interactions,
        "kcore_rounds": rounds,
        "partitions": num_parts,
        "input_files": len(schema.files),
        "item_index_order": ITEM_INDEX_ORDER,
        "tie_order": config.tie_order,
        "kept_per_user": config.max_len + 2,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "config": asdict(config),
    }
    check_identity(stats)
    if pc.sum(vocab["count"]).as_py() != kcore_rows:
        raise RuntimeError(f"item counts sum to {pc.sum(vocab['count']).as_py()} but the sequence "
                           f"pass kept {kcore_rows} k-core rows")
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def check_partitions_read(root: Path, live: list[int], reads: list[int],
                          written: list[int]) -> None:
    """Each partition task must read every row the scatter wrote to its partition: rows it
    cannot see would otherwise pass as duplicates and the accounting would still add up."""
    for p, read in zip(live, reads):
        if read != written[p]:
            raise RuntimeError(
                f"partition {p}: the scatter wrote {written[p]} rows under "
                f"{partition_dir(root, p)} but its deduplication task read {read}; the scratch "
                "directory must be on storage every node shares (--scratch-dir, --output)")


def kcore_items(count_round: Callable[[pa.Table | None], pa.Table],
                min_item: int) -> tuple[pa.Table, int]:
    """Iterate k-core rounds until every item left has >= min_item interactions.

    `count_round(keep)` returns the global item counts after keeping only the items in
    `keep` (all items when None) and then only users with enough of those. Returns the
    final counts (the k-core's items) and the number of rounds."""
    keep: pa.Table | None = None
    rounds = 0
    while True:
        rounds += 1
        counts = count_round(keep)
        surviving = counts.filter(pc.greater_equal(counts["count"], min_item))
        if surviving.num_rows == counts.num_rows:
            return counts, rounds
        keep = surviving.select(["item_id"])


def item_vocabulary(counts: pa.Table) -> pa.Table:
    """item_id, item_index (1..N by count descending, then item_id), count."""
    ordered = counts.sort_by([("count", "descending"), ("item_id", "ascending")])
    index = pa.array(range(1, ordered.num_rows + 1), pa.int32())
    return pa.table({"item_id": ordered["item_id"], "item_index": index,
                     "count": ordered["count"].cast(pa.int64())})


def check_identity(stats: dict[str, Any]) -> None:
    """input_rows = rejected + duplicates_removed + filtered_out + truncated + interactions."""
    accounted = (sum(stats["rejected"].values()) + stats["duplicates_removed"]
                 + stats["filtered_out"] + stats["truncated"] + stats["interactions"])
    if accounted != stats["input_rows"]:
        raise RuntimeError(f"row accounting is off: {stats['input_rows']} input rows, "
                           f"{accounted} accounted for ({stats})")
