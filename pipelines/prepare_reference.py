"""The prepare rules as one single-process DuckDB program: the reference the Ray pipeline
is checked against (tests/test_prepare_parity.py) and raced against
(bench/prepare_vs_duckdb.py).

Deliberately the plain way: load, deduplicate, then DELETE small items and small users
until nothing changes, then one ordered aggregation. It holds the whole log in DuckDB,
so it does not scale past one machine; it is here to be obviously right.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from pipelines.logs import REJECT_REASONS, ColumnNames
from pipelines.prepare_kernels import order_within_user
from pipelines.prepared import ITEM_INDEX_ORDER


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def prepare_with_duckdb(files: list[str], output: str | Path, names: ColumnNames,
                        min_user: int, min_item: int, max_len: int,
                        min_rating: float | None = None, threads: int | None = None,
                        tie_order: str = "hash") -> dict[str, Any]:
    """Same rules and output layout as pipelines/prepare.py; returns the same counts."""
    out = Path(output)
    (out / "sequences").mkdir(parents=True, exist_ok=True)
    (out / "items").mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"threads": threads} if threads else {})
    file_list = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    u, i, t, r = _q(names.user), _q(names.item), _q(names.timestamp), _q(names.rating)
    rating = f", {r}::DOUBLE AS rating" if min_rating is not None else ""
    con.execute(f"CREATE TABLE raw AS SELECT {u} AS user_id, {i} AS item_id, "
                f"{t}::BIGINT AS timestamp{rating} FROM read_parquet({file_list}, union_by_name = true)")
    tests = ["user_id IS NULL", "item_id IS NULL", "timestamp IS NULL"]
    if min_rating is not None:
        tests += ["rating IS NULL OR isnan(rating)", f"rating < {float(min_rating)!r}"]
    # First failing test wins, as in pipelines.logs.reject_rows.
    filters, seen = [], []
    for test in tests:
        filters.append(f"count(*) FILTER (WHERE {' AND '.join([f'NOT ({s})' for s in seen] + [f'({test})'])})")
        seen.append(test)
    input_rows, *rejected = con.execute(f"SELECT count(*), {', '.join(filters)} FROM raw").fetchone()
    valid = " AND ".join(f"NOT ({s})" for s in tests)
    con.execute(f"CREATE TABLE cur AS SELECT user_id, item_id, min(timestamp) AS timestamp "
                f"FROM raw WHERE {valid} GROUP BY user_id, item_id")
    con.execute("DROP TABLE raw")
    (deduped,) = con.execute("SELECT count(*) FROM cur").fetchone()
    while True:
        (gone_items,) = con.execute(
            "DELETE FROM cur WHERE item_id IN (SELECT item_id FROM cur GROUP BY item_id "
            f"HAVING count(*) < {int(min_item)})").fetchone()
        (gone_users,) = con.execute(
            "DELETE FROM cur WHERE user_id IN (SELECT user_id FROM cur GROUP BY user_id "
            f"HAVING count(*) < {int(min_user)})").fetchone()
        if gone_items == 0 and gone_users == 0:
            break
    (kcore_rows,) = con.execute("SELECT count(*) FROM cur").fetchone()
    con.execute("CREATE TABLE vocab AS SELECT item_id, row_number() OVER "
                "(ORDER BY count(*) DESC, item_id ASC)::INTEGER AS item_index, count(*) AS count "
                "FROM cur GROUP BY item_id")
    con.execute(f"COPY (SELECT * FROM vocab ORDER BY item_index) TO '{out}/items/part-00000.parquet' "
                "(FORMAT parquet)")
    keep_last = int(max_len) + 2
    order = order_within_user(tie_order, "c")
    con.execute(
        f"COPY (SELECT user_id, list(v.item_index ORDER BY {order})[-{keep_last}:] "
        f"AS item_index, list(c.timestamp ORDER BY {order})[-{keep_last}:] "
        f"AS timestamp FROM cur c JOIN vocab v USING (item_id) GROUP BY user_id ORDER BY user_id) "
        f"TO '{out}/sequences/part-00000.parquet' (FORMAT parquet)")
    users, items, interactions = con.execute(
        f"SELECT count(*), (SELECT count(*) FROM vocab), sum(len(item_index)) FROM "
        f"read_parquet('{out}/sequences/part-00000.parquet')").fetchone()
    con.close()
    return {
        "input_rows": input_rows,
        "rejected": dict(zip(REJECT_REASONS, rejected + [0] * (len(REJECT_REASONS) - len(rejected)))),
        "duplicates_removed": input_rows - sum(rejected) - deduped,
        "filtered_out": deduped - kcore_rows,
        "truncated": kcore_rows - int(interactions or 0),
        "users": users, "items": items, "interactions": int(interactions or 0),
        "item_index_order": ITEM_INDEX_ORDER,
    }
