"""Each prepare rule on hand-computed cases, without Ray: the validation and rejection
functions, the DuckDB partition kernels, the k-core loop, the vocabulary and the stats
identity. The whole pipeline through Ray is in test_prepare_e2e.py."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import prepare_kernels as kernels
from pipelines.logs import (ColumnNames, LogError, LogSchema, normalize, read_units, reject_rows,
                            resolve_inputs, validate)
from pipelines.prepare import (PrepareConfig, check_identity, check_partitions_read,
                               item_vocabulary, kcore_items, preflight, run_prepare)
from pipelines.prepare_reference import prepare_with_duckdb

SETTINGS = kernels.KernelSettings(threads=1, memory_limit_mb=256)


def write(path: Path, **cols) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return str(path)


def ints(*values) -> pa.Array:
    return pa.array(values, pa.int64())


# ---- rule 1: null rows are rejected, counted by their first failing reason ----

def test_reject_rows_counts_each_row_under_its_first_reason():
    table = pa.table({"user_id": ints(1, None, 2, 3, None, 4, 5, 6),
                      "item_id": ints(1, 1, None, 3, None, 4, 5, 6),
                      "timestamp": ints(1, 1, 1, None, None, 4, 5, 6),
                      "rating": pa.array([5.0, 5.0, 5.0, 5.0, 5.0, 2.0, None, float("nan")])})
    kept, counts = reject_rows(table, min_rating=None)
    assert kept["user_id"].to_pylist() == [1, 4, 5, 6]
    assert counts == {"null_user_id": 2, "null_item_id": 1, "null_timestamp": 1,
                      "null_rating": 0, "rating_below_min": 0}
    kept, counts = reject_rows(table, min_rating=3.0)
    assert kept["user_id"].to_pylist() == [1]
    # NaN is a missing rating, not a low one.
    assert counts["null_rating"] == 2 and counts["rating_below_min"] == 1


def test_normalize_maps_column_names_and_parquet_timestamps():
    table = pa.table({"who": pa.array([7], pa.int32()), "what": pa.array(["x"]).dictionary_encode(),
                      "when": pa.array([1_600_000_000], pa.timestamp("s"))})
    names = ColumnNames(user="who", item="what", timestamp="when")
    schema = LogSchema(("x.parquet",), 1, ((1,),), pa.int32(), pa.string(), False)
    out = normalize(table, names, schema)
    assert out.column_names == ["user_id", "item_id", "timestamp"]
    assert out.to_pylist() == [{"user_id": 7, "item_id": "x", "timestamp": 1_600_000_000}]
    assert out.schema.field("user_id").type == pa.int64()


# ---- bad input fails fast, naming the file and the problem ----

def test_validate_rejects_missing_column(tmp_path):
    f = write(tmp_path / "a.parquet", user_id=ints(1), item_id=ints(1))
    with pytest.raises(LogError, match=r"a\.parquet: missing column\(s\) \['timestamp'\]"):
        validate([f], ColumnNames(), with_rating=False)


@pytest.mark.parametrize("column,values,problem", [
    ("timestamp", pa.array([1.5]), "timestamps must be integers"),
    ("timestamp", pa.array(["2020-01-01"]), "timestamps must be integers"),
    ("user_id", pa.array([1.0]), "ids must be integers or strings"),
])
def test_validate_rejects_wrong_types(tmp_path, column, values, problem):
    cols = {"user_id": ints(1), "item_id": ints(1), "timestamp": ints(1)}
    cols[column] = values
    f = write(tmp_path / "bad.parquet", **cols)
    with pytest.raises(LogError, match=rf"bad\.parquet: column '{column}' has type .*{problem}"):
        validate([f], ColumnNames(), with_rating=False)


def test_validate_rejects_unreadable_file_and_mixed_id_kinds_and_empty_input(tmp_path):
    good = write(tmp_path / "good.parquet", user_id=ints(1), item_id=ints(1), timestamp=ints(1))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(LogError, match=r"broken\.parquet: cannot read as Parquet"):
        validate([good, str(broken)], ColumnNames(), with_rating=False)
    strings = write(tmp_path / "strings.parquet", user_id=pa.array(["u"]), item_id=ints(1),
                    timestamp=ints(1))
    with pytest.raises(LogError, match=r"strings\.parquet: column 'user_id' holds string ids but "
                                       r".*good\.parquet holds integer ids"):
        validate([good, strings], ColumnNames(), with_rating=False)
    empty = write(tmp_path / "empty.parquet", user_id=ints(), item_id=ints(), timestamp=ints())
    with pytest.raises(LogError, match=r"input is empty: 1 file\(s\), 0 rows .*empty\.parquet"):
        validate([empty], ColumnNames(), with_rating=False)


def test_resolve_inputs_file_directory_glob_and_missing(tmp_path):
    a = write(tmp_path / "d" / "a.parquet", x=ints(1))
    b = write(tmp_path / "d" / "sub" / "b.parquet", x=ints(1))
    assert resolve_inputs(a) == [a]
    assert resolve_inputs(str(tmp_path / "d")) == sorted([a, b])
    assert resolve_inputs(str(tmp_path / "d" / "*.parquet")) == [a]
    with pytest.raises(LogError, match="no such file or directory"):
        resolve_inputs(str(tmp_path / "nope"))
    with pytest.raises(LogError, match="glob matches no files"):
        resolve_inputs(str(tmp_path / "*.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogError, match="holds no \\*.parquet files"):
        resolve_inputs(str(tmp_path / "empty"))


def test_resolve_inputs_skips_hidden_and_underscore_folders_and_refuses_uris(tmp_path, monkeypatch):
    a = write(tmp_path / "d" / "part-0.parquet", x=ints(1))
    write(tmp_path / "d" / "_temporary" / "0" / "part-0.parquet", x=ints(1))  # Spark, unfinished
    write(tmp_path / "d" / ".out.tmp-1234" / "_scratch" / "w.parquet", x=ints(1))  # a killed prepare
    write(tmp_path / "d" / "_SUCCESS.parquet", x=ints(1))
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs("d") == [a]  # absolute: tasks on other nodes read it
    with pytest.raises(LogError, match="s3://bucket/logs: URIs are not supported; mount"):
        resolve_inputs("s3://bucket/logs")


def test_validate_accepts_valueless_columns_and_refuses_mixed_timestamp_kinds(tmp_path):
    good = write(tmp_path / "good.parquet", user_id=ints(1), item_id=ints(1), timestamp=ints(1))
    # An empty pandas shard (and a column with every cell null) has Parquet's null type.
    empty = write(tmp_path / "empty.parquet", user_id=pa.array([], pa.null()),
                  item_id=pa.array([], pa.null()), timestamp=pa.array([], pa.null()))
    nulls = write(tmp_path / "nulls.parquet", user_id=pa.array(["u", "v"]),
                  item_id=pa.array([None, None], pa.null()), timestamp=ints(1, 2))
    assert validate([good, empty], ColumnNames(), with_rating=False).num_rows == 1
    with pytest.raises(LogError, match="holds string ids but .*good.parquet holds integer ids"):
        validate([good, nulls], ColumnNames(), with_rating=False)
    kept, counts = reject_rows(normalize(pq.read_table(nulls), ColumnNames(),
                                         validate([nulls], ColumnNames(), with_rating=False)), None)
    assert kept.num_rows == 0 and counts["null_item_id"] == 2
    ms = write(tmp_path / "ms.parquet", user_id=ints(1), item_id=ints(1),
               timestamp=pa.array([1_600_000_000_000], pa.timestamp("ms")))
    us = write(tmp_path / "us.parquet", user_id=ints(1), item_id=ints(1),
               timestamp=pa.array([1_600_000_001_000_000], pa.timestamp("us")))
    with pytest.raises(LogError, match=r"us\.parquet: column 'timestamp' holds timestamps in us, no time zone but "
                                       r".*ms\.parquet holds timestamps in ms, no time zone"):
        validate([ms, us], ColumnNames(), with_rating=False)
    with pytest.raises(LogError, match="holds timestamps in ms, no time zone but .*good.parquet holds integer"):
        validate([good, ms], ColumnNames(), with_rating=False)
    # A zoned file stores UTC instants, a naive one wall-clock time: not comparable. Two
    # zones are (both are stored as UTC).
    paris = write(tmp_path / "paris.parquet", user_id=ints(1), item_id=ints(1),
                  timestamp=pa.array([1_600_000_000_000], pa.timestamp("ms", tz="Europe/Paris")))
    utc = write(tmp_path / "utc.parquet", user_id=ints(1), item_id=ints(1),
                timestamp=pa.array([1_600_000_000_000], pa.timestamp("ms", tz="UTC")))
    with pytest.raises(LogError, match=r"paris\.parquet: column 'timestamp' holds timestamps in ms, UTC instants "
                                       r"but .*ms\.parquet holds timestamps in ms, no time zone"):
        validate([ms, paris], ColumnNames(), with_rating=False)
    assert validate([paris, utc], ColumnNames(), with_rating=False).num_rows == 2


def test_ids_beyond_int64_fail_naming_the_file(tmp_path):
    from types import SimpleNamespace

    from pipelines.prepare_sink import ScatterByUserSink

    log = write(tmp_path / "hashed.parquet", user_id=pa.array([2**63 + 5], pa.uint64()),
                item_id=ints(1), timestamp=ints(1))
    schema = validate([log], ColumnNames(), with_rating=False)
    sink = ScatterByUserSink(str(tmp_path / "parts"), ColumnNames(), schema, None, 2)
    sink.on_write_start()
    with pytest.raises(LogError, match=r"hashed\.parquet: column 'user_id': .*integer ids must fit in int64"):
        sink.write([pa.table({"pieces": [[{"path": log, "row_groups": [0]}]]})], SimpleNamespace(task_idx=0))
    # A timestamp the cast cannot hold is named as one, not as an id.
    late = write(tmp_path / "late.parquet", user_id=ints(1), item_id=ints(1),
                 timestamp=pa.array([2**63 + 5], pa.uint64()))
    with pytest.raises(LogError, match=r"late\.parquet: column 'timestamp': .*timestamps must fit in int64"):
        sink.write([pa.table({"pieces": [[{"path": late, "row_groups": [0]}]]})], SimpleNamespace(task_idx=1))


def test_preflight_refuses_uris_and_an_input_inside_the_output(tmp_path):
    log = write(tmp_path / "out" / "log.parquet", user_id=ints(1), item_id=ints(1), timestamp=ints(1))
    with pytest.raises(LogError, match="inside the output directory"):
        preflight(PrepareConfig(input=log, output=str(tmp_path / "out"), overwrite=True))
    with pytest.raises(LogError, match="URIs are not supported"):
        preflight(PrepareConfig(input=log, output="s3://bucket/prep"))


def test_a_partition_task_that_misses_scatter_files_fails_the_run(tmp_path):
    check_partitions_read(tmp_path, [0, 2], [5, 7], [5, 0, 7])
    with pytest.raises(RuntimeError, match=r"partition 2: the scatter wrote 7 rows under "
                                           r".*part-00002 but its deduplication task read 6; .*share"):
        check_partitions_read(tmp_path, [0, 2], [5, 6], [5, 0, 7])


def test_a_scatter_hashed_by_two_duckdb_versions_fails_the_run():
    from pipelines.prepare_sink import ScatterCounts

    total = ScatterCounts(per_partition=[0], hash_versions={"2.0.0"})
    total.add(ScatterCounts(per_partition=[0], hash_versions={"2.0.0"}))
    total.check_one_hash_version()
    total.add(ScatterCounts(per_partition=[0], hash_versions={"1.1.3"}))
    with pytest.raises(RuntimeError, match=r"DuckDB versions \['1.1.3', '2.0.0'\]"):
        total.check_one_hash_version()


def test_each_duckdb_connection_spills_to_its_own_folder_and_removes_it(tmp_path):
    settings = kernels.KernelSettings(threads=1, memory_limit_mb=64, spill_dir=str(tmp_path))
    with kernels.connection(settings) as a, kernels.connection(settings) as b:
        dirs = {a.execute("SELECT current_setting('temp_directory')").fetchone()[0],
                b.execute("SELECT current_setting('temp_directory')").fetchone()[0]}
        assert len(dirs) == 2 and all(Path(d).parent == tmp_path for d in dirs)
    assert list(tmp_path.iterdir()) == []


def test_read_units_split_big_files_by_row_groups(tmp_path):
    f = tmp_path / "rg.parquet"
    pq.write_table(pa.table({"user_id": ints(*range(10)), "item_id": ints(*range(10)),
                             "timestamp": ints(*range(10))}), f, row_group_size=3)
    schema = validate([str(f)], ColumnNames(), with_rating=False)
    assert schema.row_group_rows == ((3, 3, 3, 1),)
    assert read_units(schema, rows_per_unit=6) == [{"pieces": [{"path": str(f), "row_groups": [0, 1]}]},
                                                   {"pieces": [{"path": str(f), "row_groups": [2, 3]}]}]


def test_read_units_pack_small_files_together(tmp_path):
    files = [write(tmp_path / f"{i}.parquet", user_id=ints(*range(2)), item_id=ints(1, 2),
                   timestamp=ints(1, 2)) for i in range(5)]
    schema = validate(files, ColumnNames(), with_rating=False)
    units = read_units(schema, rows_per_unit=4)
    assert [[(Path(p["path"]).name, p["row_groups"]) for p in u["pieces"]] for u in units] == [
        [("0.parquet", [0]), ("1.parquet", [0])], [("2.parquet", [0]), ("3.parquet", [0])],
        [("4.parquet", [0])]]


def test_existing_output_is_not_overwritten_without_flag(tmp_path):
    f = write(tmp_path / "log.parquet", user_id=ints(1), item_id=ints(1), timestamp=ints(1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory \\(use --overwrite\\)"):
        run_prepare(PrepareConfig(input=f, output=str(out)))
    assert (out / "keep.txt").read_text() == "mine"


# ---- rule 2: duplicates keep the earliest occurrence ----

def test_dedup_keeps_earliest_occurrence(tmp_path):
    write(tmp_path / "p" / "a.parquet", user_id=ints(1, 1, 1, 2), item_id=ints(5, 5, 6, 5),
          timestamp=ints(30, 10, 20, 40))
    write(tmp_path / "p" / "b.parquet", user_id=ints(1), item_id=ints(5), timestamp=ints(10))
    assert kernels.dedup(str(tmp_path / "p" / "*.parquet"), str(tmp_path / "base.parquet"),
                         SETTINGS) == (5, 3)
    got = pq.read_table(tmp_path / "base.parquet").sort_by([("user_id", "ascending"), ("item_id", "ascending")])
    assert got.to_pylist() == [{"user_id": 1, "item_id": 5, "timestamp": 10},
                               {"user_id": 1, "item_id": 6, "timestamp": 20},
                               {"user_id": 2, "item_id": 5, "timestamp": 40}]


# ---- rule 3: iterative k-core, including a cascade ----

def cascade_base(tmp_path: Path, ids=lambda v: v) -> str:
    """min_user = min_item = 2. U4 has one row and goes in round 1, which leaves item d
    with one user; d goes, U3 is left with one row and goes, which leaves c with one user;
    c goes in round 3, and the k-core is U1, U2 x a, b."""
    rows = [("U1", "a"), ("U1", "b"), ("U1", "c"), ("U2", "a"), ("U2", "b"),
            ("U3", "c"), ("U3", "d"), ("U4", "d")]
    return write(tmp_path / "base.parquet", user_id=pa.array([ids(u) for u, _ in rows]),
                 item_id=pa.array([ids(i) for _, i in rows]),
                 timestamp=ints(*range(len(rows))))


def test_kcore_cascade_takes_three_rounds(tmp_path):
    base = cascade_base(tmp_path)
    counts, rounds = kcore_items(lambda keep: kernels.item_counts(base, keep, 2, SETTINGS), 2)
    assert rounds == 3
    assert sorted(counts.to_pylist(), key=lambda r: r["item_id"]) == [
        {"item_id": "a", "count": 2}, {"item_id": "b", "count": 2}]



def test_partition_item_counts_sum_per_item():
    part = lambda ids, counts: pa.table({"item_id": pa.array(ids, pa.string()), "count": ints(*counts)})  # noqa: E731
    total = kernels.sum_item_counts(part(["a", "b"], [2, 1]), part(["b", "c"], [4, 1]), part([], []))
    assert sorted(total.to_pylist(), key=lambda r: r["item_id"]) == [
        {"item_id": "a", "count": 2}, {"item_id": "b", "count": 5}, {"item_id": "c", "count": 1}]

def test_kcore_matches_the_plain_delete_loop(tmp_path):
    base = cascade_base(tmp_path)
    stats = prepare_with_duckdb([base], tmp_path / "ref", ColumnNames(), 2, 2, max_len=10)
    assert stats["filtered_out"] == 4 and stats["users"] == 2 and stats["items"] == 2


# ---- rules 4-6: order by timestamp (ties: --tie-order), keep the last max_len + 2, item index ----

def tie_base(tmp_path):
    # User "u": items 30 and 10 share timestamp 5; keep_last = 3 cuts the oldest (item 20
    # at time 1). User "v" has one row and is below min_user = 2.
    base = write(tmp_path / "base.parquet", user_id=pa.array(["u", "u", "u", "u", "v"]),
                 item_id=ints(30, 10, 20, 40, 10), timestamp=ints(5, 5, 1, 9, 3))
    vocab = pa.table({"item_id": ints(10, 20, 30, 40), "item_index": pa.array([1, 2, 3, 4], pa.int32())})
    return base, vocab


def test_sequences_order_ties_by_item_id_and_keep_the_most_recent(tmp_path):
    base, vocab = tie_base(tmp_path)
    counts = kernels.sequences(base, vocab, 2, 3, str(tmp_path / "seq.parquet"), pa.string(), SETTINGS,
                               tie_order="item_id")
    assert counts == kernels.SequenceCounts(users=1, interactions=3, kcore_rows=4)
    got = pq.read_table(tmp_path / "seq.parquet")
    assert got.to_pylist() == [{"user_id": "u", "item_index": [1, 3, 4], "timestamp": [5, 5, 9]}]
    assert got.schema.field("item_index").type == pa.list_(pa.int32())
    assert got.schema.field("timestamp").type == pa.list_(pa.int64())
    # A partition whose users all fall below min_user writes an empty, well-typed file.
    none = kernels.sequences(base, vocab, 9, 3, str(tmp_path / "empty.parquet"), pa.string(), SETTINGS)
    assert none == kernels.SequenceCounts(users=0, interactions=0, kcore_rows=0)
    assert pq.read_table(tmp_path / "empty.parquet").schema == got.schema


def test_sequences_stream_in_batches_with_users_split_across_them(tmp_path):
    # 30 users of 1..7 rows: batches of 1, 4 and 5 rows split users (a user's rows then wait
    # for the next batch); every batch size must give the one-batch result.
    import random

    rng = random.Random(4)
    rows = [(u, i, rng.randrange(20)) for u in range(30) for i in rng.sample(range(50), rng.randint(1, 7))]
    base = write(tmp_path / "base.parquet", user_id=ints(*[r[0] for r in rows]),
                 item_id=ints(*[r[1] for r in rows]), timestamp=ints(*[r[2] for r in rows]))
    vocab = pa.table({"item_id": ints(*range(50)), "item_index": pa.array(range(1, 51), pa.int32())})
    outputs = {}
    for batch_rows in (1, 4, 5, 10_000):
        out = tmp_path / f"seq{batch_rows}.parquet"
        counts = kernels.sequences(base, vocab, 3, 4, str(out), pa.int64(), SETTINGS, batch_rows=batch_rows)
        outputs[batch_rows] = (counts, pq.read_table(out).to_pylist())
    assert all(o == outputs[10_000] for o in outputs.values())
    counts, table = outputs[10_000]
    lengths = [sum(1 for r in rows if r[0] == u) for u in range(30)]
    assert counts.users == sum(n >= 3 for n in lengths) == len(table)
    assert counts.interactions == sum(min(n, 4) for n in lengths if n >= 3)


def md5_key(user: str, item: int) -> str:
    return hashlib.md5(f"{user}\x1f{item}".encode()).hexdigest()


def test_hash_tie_order_is_md5_of_user_and_item(tmp_path):
    base, vocab = tie_base(tmp_path)
    kernels.sequences(base, vocab, 2, 3, str(tmp_path / "seq.parquet"), pa.string(), SETTINGS)
    tied = sorted([10, 30], key=lambda item: md5_key("u", item))
    index = {10: 1, 30: 3}
    assert pq.read_table(tmp_path / "seq.parquet").to_pylist() == [
        {"user_id": "u", "item_index": [index[tied[0]], index[tied[1]], 4], "timestamp": [5, 5, 9]}]


def test_hash_tie_order_differs_between_users_so_no_item_order_is_learnable(tmp_path):
    # 40 users rate items 1 and 2 in the same second. Under item_id every user has 1 -> 2,
    # the fixed pair order a model can learn; the per-user hash gives both orders.
    users = [f"user{k}" for k in range(40)]
    base = write(tmp_path / "base.parquet", user_id=pa.array([u for u in users for _ in (1, 2)]),
                 item_id=ints(*[i for _ in users for i in (1, 2)]), timestamp=ints(*[7] * 80))
    vocab = pa.table({"item_id": ints(1, 2), "item_index": pa.array([1, 2], pa.int32())})
    orders = {}
    for tie_order in kernels.TIE_ORDERS:
        kernels.sequences(base, vocab, 2, 2, str(tmp_path / f"{tie_order}.parquet"), pa.string(),
                          SETTINGS, tie_order=tie_order)
        rows = pq.read_table(tmp_path / f"{tie_order}.parquet").to_pylist()
        orders[tie_order] = {r["user_id"]: r["item_index"] for r in rows}
    assert set(map(tuple, orders["item_id"].values())) == {(1, 2)}
    expected = {u: sorted([1, 2], key=lambda item: md5_key(u, item)) for u in users}
    assert orders["hash"] == expected
    assert {tuple(v) for v in expected.values()} == {(1, 2), (2, 1)}


def test_unknown_tie_order_is_refused():
    with pytest.raises(ValueError, match="--tie-order must be one of"):
        PrepareConfig(input="x", output="y", tie_order="title")
    with pytest.raises(ValueError, match="tie order must be one of"):
        kernels.order_within_user("random")


def test_item_vocabulary_is_count_descending_then_id_and_starts_at_one():
    counts = pa.table({"item_id": pa.array(["b", "c", "a", "d"]), "count": ints(5, 7, 5, 9)})
    vocab = item_vocabulary(counts)
    assert vocab.to_pylist() == [{"item_id": "d", "item_index": 1, "count": 9},
                                 {"item_id": "c", "item_index": 2, "count": 7},
                                 {"item_id": "a", "item_index": 3, "count": 5},
                                 {"item_id": "b", "item_index": 4, "count": 5}]
    assert vocab.schema.field("item_index").type == pa.int32()


# ---- the stats identity ----

def test_identity_holds_and_its_check_catches_a_lost_row():
    stats = {"input_rows": 19, "rejected": {"null_user_id": 2, "null_item_id": 1, "null_timestamp": 1},
             "duplicates_removed": 2, "filtered_out": 5, "truncated": 2, "interactions": 6}
    check_identity(stats)
    with pytest.raises(RuntimeError, match="row accounting is off"):
        check_identity({**stats, "interactions": 5})


def test_config_rejects_nonsense_settings():
    with pytest.raises(ValueError, match="--max-len must be >= 1"):
        PrepareConfig(input="x", output="y", max_len=0)
    with pytest.raises(ValueError, match="columns must be distinct, got \\['ts', 'item_id', 'ts'\\]"):
        PrepareConfig(input="x", output="y", user_column="ts", timestamp_column="ts")


# ---- the streaming scatter: retries are idempotent ----

def test_scatter_retry_replaces_its_files_and_leftovers_are_ignored(tmp_path):
    from types import SimpleNamespace

    from pipelines.prepare_sink import ScatterByUserSink, partition_dir

    log = write(tmp_path / "log.parquet", user_id=ints(1, 2, 3, 4, None), item_id=ints(1, 1, 2, 2, 3),
                timestamp=ints(5, 6, 7, 8, 9))
    schema = validate([log], ColumnNames(), with_rating=False)
    sink = ScatterByUserSink(str(tmp_path / "parts"), ColumnNames(), schema, None, 2)
    sink.on_write_start()
    unit = pa.table({"pieces": [[{"path": log, "row_groups": [0]}]]})
    ctx = SimpleNamespace(task_idx=7)
    first = sink.write([unit], ctx)
    # A killed attempt's unfinished file, then the retry of the same task.
    (partition_dir(sink.root, 0) / ".w000007-dead.parquet.tmp").write_bytes(b"half a file")
    again = sink.write([unit], ctx)
    assert first == again and again.rows == 5 and again.rejected["null_user_id"] == 1
    assert sum(again.per_partition) == 4
    files = sorted(p.name for p in Path(sink.root).rglob("*.parquet"))
    assert files == ["w000007.parquet"] * sum(1 for n in again.per_partition if n)
    read_written = [kernels.dedup(str(partition_dir(sink.root, p) / "*.parquet"),
                                  str(tmp_path / f"base{p}.parquet"), SETTINGS)
                    for p in range(2) if again.per_partition[p]]
    assert [read for read, _ in read_written] == [n for n in again.per_partition if n]
    assert sum(written for _, written in read_written) == 4
