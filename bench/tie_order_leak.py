r"""How predictable each prepared directory's order is, measured with a model that learns
nothing but item-to-item order: first-order transition counts (slmrec.transitions), test
item = each user's last, full ranking, history not masked.

Give the same log prepared with different `--tie-order`s: a fixed order of items with the
same timestamp (item_id) lets this yardstick, and any sequence model, learn which item of
a same-second batch comes next, which inflates every metric against a per-user hash order.
Also reported: the share of consecutive training pairs with the same timestamp.

    python jobs/prepare.py --input out/logs/ml-1m --output out/ml-1m-full200h \
        --min-user-interactions 1 --min-item-interactions 1 --max-len 200          # hash
    python jobs/prepare.py ... --output out/ml-1m-full200 --tie-order item_id
    python bench/tie_order_leak.py --data out/ml-1m-full200 out/ml-1m-full200h \
        --output out/bench/tie-order
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.prepared import SEQUENCES_DIR, num_items, read_stats
from bench.outputs import write_outputs
from slmrec.batching import train_pair
from slmrec.config import field, parse_config
from slmrec.metrics import MetricSums, ranks_from_scores
from slmrec.transitions import TransitionCounts, last_item_and_target

METRICS = ("NDCG@10", "HR@10", "HR@1", "MRR")


@dataclasses.dataclass
class BenchConfig:
    data: tuple[str, ...] = field(help="prepared directories (jobs/prepare.py --output) to compare")
    train_on_valid: bool = field(True, help="count the validation item's transition too, as "
                                            "generative-recommenders' split trains on it")
    batch_size: int = field(1024, help="users scored at a time")
    output: str | None = field(None, help="directory for tie_order_leak.json and .md")


def measure(path: str, cfg: BenchConfig) -> dict[str, Any]:
    table = pq.read_table(Path(path) / SEQUENCES_DIR, columns=["item_index", "timestamp"])
    sequences = [np.asarray(s, dtype=np.int64) for s in table["item_index"].to_pylist()]
    # The training pairs the transitions are counted on (slmrec.batching's split), by timestamp.
    same = total = 0
    for ts in table["timestamp"].to_pylist():
        before, after = train_pair(np.asarray(ts), len(ts), cfg.train_on_valid)
        same += int((before == after).sum())
        total += len(before)
    fit = TransitionCounts.fit(sequences, num_items(path), cfg.train_on_valid)
    last, targets = last_item_and_target(sequences)
    sums = MetricSums()
    for start in range(0, len(sequences), cfg.batch_size):
        stop = start + cfg.batch_size
        sums.add(ranks_from_scores(fit.scores(last[start:stop]), targets[start:stop]))
    stats = read_stats(path)
    return {"data": path, "users": len(sequences),
            # Directories prepared before --tie-order existed ordered ties by item_id.
            "tie_order": stats.get("tie_order", "item_id"),
            "same_timestamp_pairs": same / max(total, 1), **sums.result()}


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]]) -> str:
    split = "validation item trained on" if cfg.train_on_valid else "validation item held out"
    lines = [f"first-order transition counts, test item = last, full ranking, history not masked, {split}",
             "", "| prepared data | tie order | users | same-timestamp pairs | "
             + " | ".join(METRICS) + " |", "|---|---|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        lines.append(f"| `{r['data']}` | {r['tie_order']} | {r['users']} | {r['same_timestamp_pairs']:.1%} | "
                     + " | ".join(f"{r[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_config(BenchConfig, __doc__.split("\n\n")[0], argv)
    if cfg.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    torch.set_num_threads(1)
    rows = [measure(path, cfg) for path in cfg.data]
    write_outputs(cfg.output, "tie_order_leak", {"config": dataclasses.asdict(cfg), "rows": rows},
                  markdown(cfg, rows))
    return rows


if __name__ == "__main__":
    main()
