"""A synthetic interaction log for scale work: N rows, sharded Parquet, deterministic by seed.

Shape of the data, chosen so that the prepare stage has real work and a sequence model has
something to learn beyond popularity:
 - item popularity is Zipf(a) over `items` items (rank -> id through a fixed shuffle);
 - each user's next item is, with probability `follow`, the fixed successor of the previous
   item (one random permutation of items, shared by all users), else a fresh popularity
   draw: a first-order Markov chain that a next-item model can learn and popularity cannot;
 - user lengths vary (1 + a gamma-weighted multinomial share), so k-core filtering bites;
 - timestamps increase per user with exponential gaps and some exact ties (gap 0), so the
   tie order (prepare --tie-order) matters; the Markov chain may revisit an item, which
   makes duplicate (user, item) pairs; ratings are 1-5;
 - rows are shuffled within a shard, as in a real log.
Generation is per shard of `rows_per_shard` rows with its own seed ([seed, shard]), so memory
is one shard whatever N is, and any shard can be regenerated alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START_TIME = 1_500_000_000  # unix seconds, mid-2017


@dataclass(frozen=True)
class SyntheticSpec:
    rows: int
    items: int = 0  # 0: max(100, rows // 500)
    mean_len: int = 50
    zipf_a: float = 1.05
    follow: float = 0.6
    tie_prob: float = 0.05
    seed: int = 0
    rows_per_shard: int = 1_000_000

    def __post_init__(self) -> None:
        if self.rows < 1 or self.mean_len < 1 or self.rows_per_shard < 1:
            raise ValueError("rows, mean_len and rows_per_shard must be >= 1")
        if not 0.0 <= self.follow <= 1.0 or not 0.0 <= self.tie_prob <= 1.0:
            raise ValueError("follow and tie_prob are probabilities")

    @property
    def num_items(self) -> int:
        return self.items or max(100, self.rows // 500)

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, self.rows - shard * self.rows_per_shard)

    @property
    def users_per_full_shard(self) -> int:
        return max(1, self.rows_per_shard // self.mean_len)


@dataclass(frozen=True)
class ItemModel:
    """Item-level structure shared by all shards: popularity and successors."""

    cdf: np.ndarray  # cumulative Zipf probabilities by popularity rank
    rank_to_item: np.ndarray  # item id of each popularity rank (ids are 1..items)
    successor: np.ndarray  # successor[item id] = the next item id in the chain

    @classmethod
    def build(cls, spec: SyntheticSpec) -> "ItemModel":
        rng = np.random.default_rng([spec.seed, 2**31 - 1])
        n = spec.num_items
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** spec.zipf_a
        cdf = np.cumsum(weights / weights.sum())
        cdf[-1] = 1.0
        rank_to_item = rng.permutation(n).astype(np.int64) + 1
        successor = np.zeros(n + 1, dtype=np.int64)
        successor[1:] = rng.permutation(n) + 1
        return cls(cdf, rank_to_item, successor)

    def popular(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self.rank_to_item[np.searchsorted(self.cdf, rng.random(size), side="right")]


def generate_shard(spec: SyntheticSpec, shard: int, model: ItemModel | None = None) -> pa.Table:
    """Rows of one shard: user_id, item_id, rating (int8), timestamp (int64 seconds)."""
    model = model or ItemModel.build(spec)
    rng = np.random.default_rng([spec.seed, shard])
    rows = spec.shard_rows(shard)
    users = max(1, min(rows, rows // spec.mean_len))
    share = rng.gamma(0.7, size=users)
    lengths = 1 + rng.multinomial(rows - users, share / share.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    items = np.empty(rows, dtype=np.int64)
    times = np.empty(rows, dtype=np.int64)
    current = model.popular(rng, users)
    clock = START_TIME + rng.integers(0, 365 * 86400, size=users)
    items[offsets], times[offsets] = current, clock
    for pos in range(1, int(lengths.max())):
        active = np.nonzero(lengths > pos)[0]
        follow = rng.random(active.size) < spec.follow
        nxt = np.where(follow, model.successor[current[active]], model.popular(rng, active.size))
        gap = rng.exponential(3600.0, size=active.size).astype(np.int64) + 1
        gap[rng.random(active.size) < spec.tie_prob] = 0
        current[active] = nxt
        clock[active] += gap
        items[offsets[active] + pos], times[offsets[active] + pos] = nxt, clock[active]

    user_ids = np.repeat(np.arange(users, dtype=np.int64) + shard * spec.users_per_full_shard + 1,
                         lengths)
    ratings = rng.choice(np.arange(1, 6, dtype=np.int8), size=rows, p=[0.05, 0.1, 0.25, 0.35, 0.25])
    order = rng.permutation(rows)
    return pa.table({"user_id": user_ids[order], "item_id": items[order],
                     "rating": ratings[order], "timestamp": times[order]})


def write_synthetic(spec: SyntheticSpec, out_dir: str | Path) -> list[Path]:
    """Write every shard as out_dir/shard-XXXXX.parquet; memory is one shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = ItemModel.build(spec)
    paths = []
    for shard in range(spec.num_shards):
        path = out / f"shard-{shard:05d}.parquet"
        pq.write_table(generate_shard(spec, shard, model), path)
        paths.append(path)
    return paths
