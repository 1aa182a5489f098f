"""Tiny models and a tiny prepared directory shared by the serving, scoring and int8 tests.

The prepared directory follows pipelines/prepared.py's layout. Original ids are chosen
so that they differ from item indices (item id = 1000 + 7 * index, user ids are strings)
and a test cannot pass by confusing the two.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from slmrec.backbones import BackboneConfig
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender

NUM_ITEMS = 40
ITEM_DIM = 16
MAX_LEN = 8


def item_id(index: int) -> int:
    return 1000 + 7 * index


def tiny_model(seed: int = 0, lora: str = "off", max_len: int = MAX_LEN) -> SeqRecommender:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=gen)
    table[0] = 0
    config = RecommenderConfig(
        num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=max_len,
        backbone=BackboneConfig(name="scratch", layers=2, hidden=32, heads=2, lora=lora))
    return build_recommender(config, table, seed=seed).eval()


def random_histories(num_users: int, seed: int = 0, longest: int = 12) -> list[list[int]]:
    """Item-index histories of 3..longest distinct items (some longer than MAX_LEN)."""
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(3, longest + 1)),
                       replace=False).tolist() for _ in range(num_users)]


def write_prepared(directory: Path, histories: list[list[int]], files: int = 2) -> Path:
    """A prepared directory: users "u0".."u{n-1}" with these item-index histories,
    sequences split over `files` Parquet files; item counts from the histories
    (items nobody used get count 0 and are still in the vocabulary)."""
    (directory / "sequences").mkdir(parents=True)
    (directory / "items").mkdir()
    users = [f"u{i}" for i in range(len(histories))]
    bounds = np.linspace(0, len(users), files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        table = pa.table({
            "user_id": pa.array(users[lo:hi], pa.string()),
            "item_index": pa.array(histories[lo:hi], pa.list_(pa.int32())),
            "timestamp": pa.array([list(range(len(h))) for h in histories[lo:hi]],
                                  pa.list_(pa.int64())),
        })
        pq.write_table(table, directory / "sequences" / f"part-{f}.parquet")
    counts = np.bincount(np.concatenate(histories), minlength=NUM_ITEMS + 1)[1:]
    indices = np.arange(1, NUM_ITEMS + 1)
    pq.write_table(pa.table({
        "item_id": pa.array([item_id(i) for i in indices], pa.int64()),
        "item_index": pa.array(indices, pa.int32()),
        "count": pa.array(counts, pa.int64()),
    }), directory / "items" / "part-0.parquet")
    (directory / "stats.json").write_text(json.dumps({"users": len(users), "items": NUM_ITEMS}))
    return directory
