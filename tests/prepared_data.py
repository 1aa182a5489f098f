"""A tiny prepared dataset (the layout jobs/prepare.py writes) with learnable structure,
for tests of the training, distillation, tuning and serving stages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_prepared(root: Path, users: int = 64, items: int = 30, length: int = 12, seed: int = 0) -> Path:
    """Each user walks the item ring with a user-specific stride, so the next item is
    predictable from the last two; string user ids and item ids like the real importers."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sequences").mkdir(exist_ok=True)
    (root / "items").mkdir(exist_ok=True)
    seqs, counts = [], np.zeros(items + 1, dtype=np.int64)
    for u in range(users):
        start, stride = int(rng.integers(1, items + 1)), 1 + u % 3
        n = int(rng.integers(length // 2, length + 1))
        seq = [(start - 1 + stride * t) % items + 1 for t in range(n)]
        seqs.append(seq)
        counts[seq] += 1
    table = pa.table({
        "user_id": [f"u{u}" for u in range(users)],
        "item_index": pa.array(seqs, type=pa.list_(pa.int32())),
        "timestamp": pa.array([list(range(1000, 1000 + len(s))) for s in seqs], type=pa.list_(pa.int64())),
    })
    pq.write_table(table, root / "sequences" / "part-0.parquet")
    pq.write_table(pa.table({
        "item_id": [f"item{i}" for i in range(1, items + 1)],
        "item_index": pa.array(range(1, items + 1), type=pa.int32()),
        "count": pa.array(counts[1:], type=pa.int64()),
    }), root / "items" / "part-0.parquet")
    interactions = int(sum(len(s) for s in seqs))
    (root / "stats.json").write_text(json.dumps({
        "input_rows": interactions, "rejected": {}, "duplicates_removed": 0, "filtered_out": 0,
        "truncated": 0, "users": users, "items": items, "interactions": interactions}))
    return root
