"""The prepare stage end to end through real Ray: a hand-computed log that exercises every
rule across several partitions, MovieLens-100k with its known counts, and a failing run
that must leave nothing behind."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import prepare as prepare_job
from pipelines import importers, prepared
from pipelines.logs import LogError
from pipelines.prepare import PrepareConfig, run_prepare


def hand_log(root: Path) -> str:
    """19 rows over two files, columns named uid/iid/ts plus an unused rating.

    U1: 12@50, 10@100, 11@100 (tie: 10 first), 13@400, and 10@300 again (duplicate).
    U2: 10@5, 11@6, 13@7, 12@8, and 10@5 again (exact duplicate).
    U3: 14, 15; U4: 15; U5: 14, 16 -> cascade: U4 goes (1 row), so 15 and 16 have one
    user each and go, then U3 and U5 have one row each and go, and 14 with them.
    Four null rows. min_user = min_item = 2, max_len = 1 (keep 3 per user)."""
    root.mkdir(parents=True)
    a = [(1, 12, 50), (1, 10, 100), (1, 11, 100), (1, 13, 400), (1, 10, 300),
         (2, 10, 5), (2, 11, 6), (2, 13, 7), (2, 12, 8), (2, 10, 5)]
    b = [(3, 14, 1), (3, 15, 2), (4, 15, 1), (5, 14, 3), (5, 16, 4),
         (None, 10, 1), (6, None, 1), (6, 10, None), (None, None, None)]
    for name, rows in (("a", a), ("b", b)):
        u, i, t = zip(*rows)
        pq.write_table(pa.table({"uid": pa.array(u, pa.int64()), "iid": pa.array(i, pa.int64()),
                                 "ts": pa.array(t, pa.int64()),
                                 "rating": pa.array([1.0] * len(rows))}), root / f"{name}.parquet")
    return str(root)


def test_hand_computed_log_through_ray(ray_session, tmp_path):
    out = tmp_path / "prep"
    stats = run_prepare(PrepareConfig(
        input=hand_log(tmp_path / "log"), output=str(out), min_user_interactions=2,
        min_item_interactions=2, max_len=1, user_column="uid", item_column="iid",
        timestamp_column="ts", num_partitions=3))
    assert {k: stats[k] for k in ("input_rows", "rejected", "duplicates_removed", "filtered_out",
                                  "truncated", "users", "items", "interactions", "kcore_rounds")} == {
        "input_rows": 19,
        "rejected": {"null_user_id": 2, "null_item_id": 1, "null_timestamp": 1,
                     "null_rating": 0, "rating_below_min": 0},
        "duplicates_removed": 2, "filtered_out": 5, "truncated": 2,
        "users": 2, "items": 4, "interactions": 6, "kcore_rounds": 2}
    # input_rows = rejected + duplicates_removed + filtered_out + truncated + interactions
    assert 19 == 4 + 2 + 5 + 2 + 6
    assert prepared.read_stats(out) == stats
    assert prepared.num_items(out) == 4
    vocab = prepared.load_item_vocab(out)
    assert vocab.to_pylist() == [{"item_id": i, "item_index": i - 9, "count": 2} for i in (10, 11, 12, 13)]
    rows = sorted(prepared.sequences_dataset(out).take_all(), key=lambda r: r["user_id"])
    assert [(r["user_id"], list(r["item_index"]), list(r["timestamp"])) for r in rows] == [
        (1, [1, 2, 4], [100, 100, 400]),   # 12@50 truncated; 10 before 11 at the tie
        (2, [2, 4, 3], [6, 7, 8])]         # 10@5 truncated
    assert not list(tmp_path.glob(".prep.tmp-*")), "temporary output left behind"

    # Training re-reads the sequences every epoch: through the V1 Parquet reader, which
    # starts no footer-reader actors, and without changing the session's default.
    import ray.data

    context = ray.data.DataContext.get_current()
    default = context.use_datasource_v2
    source = prepared.sequences_dataset(out)._logical_plan.dag
    while source.input_dependencies:
        source = source.input_dependencies[0]
    assert type(source).__name__ == "Read" and type(source.datasource).__name__ == "ParquetDatasource"
    assert context.use_datasource_v2 == default


def test_movielens_100k_known_counts_through_the_job(ray_session, tmp_path):
    log = importers.movielens_100k(tmp_path / "log")
    out = tmp_path / "ml-100k"
    stats = prepare_job.main(["--input", str(log), "--output", str(out),
                              "--min-user-interactions", "5", "--min-item-interactions", "5",
                              "--max-len", "50"])
    # 100,000 ratings, 943 users (each has >= 20 ratings), 1,682 items; 333 items have
    # fewer than 5 ratings, so the 5-core keeps all users and 1,349 items (99,287 ratings).
    assert stats["input_rows"] == 100_000
    assert sum(stats["rejected"].values()) == 0 and stats["duplicates_removed"] == 0
    assert stats["users"] == 943 and stats["items"] == 1_349
    assert stats["interactions"] + stats["truncated"] == 99_287
    assert stats["filtered_out"] == 713
    seqs = pq.read_table(out / "sequences")
    lengths = pc.list_value_length(seqs["item_index"])
    assert pc.max(lengths).as_py() == 52 and pc.min(lengths).as_py() >= 5
    assert stats["interactions"] == pc.sum(lengths).as_py() == 41_001
    assert pc.max(pc.list_flatten(seqs["item_index"])).as_py() == 1_349
    assert json.loads((out / "stats.json").read_text())["item_index_order"].startswith("count")


def test_job_fails_fast_on_bad_input_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [1], "item": [2], "timestamp": [3]}), bad)
    # No ray_session: the check runs before Ray would start.
    with pytest.raises(SystemExit, match=r"prepare: .*log\.parquet: missing column\(s\) \['item_id'\]"):
        prepare_job.main(["--input", str(bad), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_no_output(ray_session, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(LogError, match="k-core is empty"):
        run_prepare(PrepareConfig(input=hand_log(tmp_path / "log"), output=str(out),
                                  min_user_interactions=50, user_column="uid",
                                  item_column="iid", timestamp_column="ts"))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["log"]


def test_partition_tasks_no_node_can_run_are_refused_not_left_pending(ray_session, tmp_path):
    # The session's Ray has 2 CPUs: tasks of 3 threads would wait for a node forever.
    argv = ["--input", hand_log(tmp_path / "log"), "--output", str(tmp_path / "out"),
            "--user-column", "uid", "--item-column", "iid", "--timestamp-column", "ts"]
    with pytest.raises(SystemExit, match=r"prepare: no node can run a partition task of --task-threads 3 "
                                         r"and --task-memory-mb 2048 \(the largest node has 2 CPUs"):
        prepare_job.main([*argv, "--task-threads", "3"])
    with pytest.raises(SystemExit, match="--task-memory-mb 99999999"):
        prepare_job.main([*argv, "--task-memory-mb", "99999999"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]
