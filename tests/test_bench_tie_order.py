"""bench/tie_order_leak.py on two hand-made prepared directories (the same log under both
tie orders, sequences built by the prepare kernel): accounting, labels and the report."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.tie_order_leak import main
from pipelines import prepare_kernels as kernels


def prepared(tmp_path, tie_order: str) -> str:
    # 40 users rate items 1 and 2 in the same second, then 3, then 4 (the test item).
    users = [f"u{k}" for k in range(40)]
    base = tmp_path / "base.parquet"
    pq.write_table(pa.table({"user_id": [u for u in users for _ in range(4)],
                             "item_id": pa.array([1, 2, 3, 4] * 40, pa.int64()),
                             "timestamp": pa.array([1, 1, 2, 3] * 40, pa.int64())}), base)
    out = tmp_path / tie_order
    (out / "sequences").mkdir(parents=True)
    (out / "items").mkdir()
    vocab = pa.table({"item_id": pa.array([1, 2, 3, 4], pa.int64()),
                      "item_index": pa.array([1, 2, 3, 4], pa.int32()), "count": pa.array([40] * 4, pa.int64())})
    kernels.sequences(str(base), vocab.select(["item_id", "item_index"]), 1, 10,
                      str(out / "sequences" / "part-00000.parquet"), pa.string(),
                      kernels.KernelSettings(threads=1, memory_limit_mb=256), tie_order=tie_order)
    pq.write_table(vocab, out / "items" / "part-00000.parquet")
    stats = {"items": 4, "users": 40} | ({"tie_order": tie_order} if tie_order == "hash" else {})
    (out / "stats.json").write_text(json.dumps(stats))
    return str(out)


def test_bench_reports_each_directory(tmp_path):
    dirs = [prepared(tmp_path, "item_id"), prepared(tmp_path, "hash")]
    rows = main(["--data", *dirs, "--output", str(tmp_path / "report")])
    # No stats entry means the order before the flag existed: item_id.
    assert [r["tie_order"] for r in rows] == ["item_id", "hash"]
    for row in rows:
        assert row["users"] == 40
        # Training part 1,2,3 (the validation item trained on): one of two pairs is tied.
        assert row["same_timestamp_pairs"] == pytest.approx(0.5)
        # 3 -> 4 was never seen, so popularity ranks; items 2 and 3 (and 1 under the hash,
        # where some users end the tie on 1) are more popular targets, and item 1 ties the
        # target at 0 under item_id (pessimistic): rank 3 either way.
        assert row["NDCG@10"] == pytest.approx(1 / math.log2(5))
    report = json.loads((tmp_path / "report" / "tie_order_leak.json").read_text())
    assert [r["data"] for r in report["rows"]] == dirs
    assert (tmp_path / "report" / "tie_order_leak.md").read_text().count("\n| `") == 2
