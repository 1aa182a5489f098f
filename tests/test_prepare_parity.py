"""The Ray pipeline against the plain DuckDB reference (pipelines/prepare_reference.py) on
a synthetic log with string ids, null cells, NaN and low ratings and more partitions than the
k-core's count-summing fan-in (so its counts go through the task tree): every output row
and every count must agree."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.logs import ColumnNames
from pipelines.prepare import SUM_FAN_IN, PrepareConfig, run_prepare
from pipelines.prepare_reference import prepare_with_duckdb
from pipelines.synthetic import SyntheticSpec, generate_shard


def messy_log(path) -> str:
    table = generate_shard(SyntheticSpec(rows=20_000, items=300, mean_len=12, seed=3), 0)
    rng = np.random.default_rng(0)

    def with_nulls(col: pa.Array, share: float) -> pa.Array:
        return pc.if_else(pa.array(rng.random(len(col)) < share), pa.nulls(len(col), col.type), col)

    def with_nans(col: pa.Array, share: float) -> pa.Array:
        col = col.cast(pa.float64())
        return pc.if_else(pa.array(rng.random(len(col)) < share), pa.scalar(float("nan")), col)

    users = pc.binary_join_element_wise("user-", table["user_id"].cast(pa.string()), "")
    items = pc.binary_join_element_wise("item-", table["item_id"].cast(pa.string()), "")
    log = pa.table({"user": with_nulls(users.combine_chunks(), 0.01),
                    "item": with_nulls(items.combine_chunks(), 0.01),
                    "ts": with_nulls(table["timestamp"].combine_chunks(), 0.01),
                    "stars": with_nulls(with_nans(table["rating"].combine_chunks(), 0.01), 0.01)})
    path.mkdir()
    # Several files and row groups, so the read is split into several units.
    for k, start in enumerate(range(0, log.num_rows, 7_000)):
        pq.write_table(log.slice(start, 7_000), path / f"part-{k}.parquet", row_group_size=2_000)
    return str(path)


def test_ray_pipeline_matches_duckdb_reference(ray_session, tmp_path):
    log = messy_log(tmp_path / "log")
    names = ColumnNames(user="user", item="item", timestamp="ts", rating="stars")
    config = PrepareConfig(input=log, output=str(tmp_path / "ray"), min_user_interactions=5,
                           min_item_interactions=10, max_len=8, min_rating=3, user_column="user",
                           item_column="item", timestamp_column="ts", rating_column="stars",
                           num_partitions=SUM_FAN_IN + 4, read_batch_rows=3_000)
    ours = run_prepare(config)
    ref = prepare_with_duckdb(sorted(str(p) for p in (tmp_path / "log").glob("*.parquet")),
                              tmp_path / "ref", names, 5, 10, 8, min_rating=3)
    keys = ("input_rows", "rejected", "duplicates_removed", "filtered_out", "truncated",
            "users", "items", "interactions")
    assert {k: ours[k] for k in keys} == {k: ref[k] for k in keys}
    assert all(v > 0 for v in ours["rejected"].values()), ours["rejected"]
    assert ours["duplicates_removed"] > 0 and ours["truncated"] > 0 and ours["filtered_out"] > 0

    def table(root, sub, key):
        return pq.read_table(root / sub).sort_by(key)

    seq_ours, seq_ref = table(tmp_path / "ray", "sequences", "user_id"), table(tmp_path / "ref", "sequences", "user_id")
    assert seq_ours.schema.field("user_id").type == pa.string()
    assert seq_ours.to_pylist() == seq_ref.to_pylist()
    assert (table(tmp_path / "ray", "items", "item_index").to_pylist()
            == table(tmp_path / "ref", "items", "item_index").to_pylist())
