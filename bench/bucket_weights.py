r"""How length bucketing re-weights the training objective. Every loss is a mean over its
batch's target positions, so the weight of one position is 1 / (positions in its batch):
with shuffled batches about the same for every position, with length-sorted batches
(`--length-bucket-window`) much larger for short histories. Reports, for shuffled and for
bucketed batches of the prepared data's training pairs, the per-position weight of the
shortest quarter of users over the longest quarter's, and the shortest quarter's share of
the objective beside its share of the positions (an equal weight per user gives 25%).

    python bench/bucket_weights.py --data out/ml-1m-full200h --max-len 200 --batch-size 32 \
        --train-on-valid --output out/bench/bucket-weights
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.outputs import write_outputs
from pipelines.prepared import SEQUENCES_DIR
from slmrec.batching import train_pair
from slmrec.bucketing import deal_rows
from slmrec.config import field, parse_config


@dataclasses.dataclass
class BenchConfig:
    data: str = field(help="prepared directory (jobs/prepare.py --output)")
    max_len: int = field(200, help="items a model reads, as the training job's --max-len")
    batch_size: int = field(32, help="rows per batch, as the training job's --batch-size")
    window: int = field(16, help="batches sorted together, as --length-bucket-window")
    train_on_valid: bool = field(False, help="the validation item is a training target too")
    seed: int = field(0, help="shuffle seed")
    output: str | None = field(None, help="directory for bucket_weights.json and .md")


def position_weights(lengths: torch.Tensor, batches: list[torch.Tensor]) -> torch.Tensor:
    """Weight of each row's positions: 1 / (target positions of the row's batch)."""
    weights = torch.zeros(len(lengths), dtype=torch.float64)
    for rows in batches:
        weights[rows] = 1.0 / max(int(lengths[rows].sum()), 1)
    return weights


def quarter_stats(lengths: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Shortest vs longest quarter of the rows (by positions): per-position weight ratio,
    and the shortest quarter's share of the objective and of the positions."""
    order = torch.argsort(lengths, stable=True)
    quarter = len(order) // 4
    short, long_ = order[:quarter], order[-quarter:]
    mass = weights * lengths
    return {"weight_ratio": float(weights[short].mean() / weights[long_].mean()),
            "objective_share": float(mass[short].sum() / mass.sum()),
            "position_share": float(lengths[short].sum() / lengths.sum())}


def epoch_batches(n: int, batch_size: int, window: int, lengths: torch.Tensor,
                  seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One epoch's shuffled batches (drop_last) and the same rows dealt by length per window."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = perm[:n // batch_size * batch_size]
    shuffled = list(perm.split(batch_size))
    bucketed: list[torch.Tensor] = []
    for start in range(0, len(shuffled), max(window, 1)):
        rows = torch.cat(shuffled[start:start + window])
        sizes = [batch_size] * (len(rows) // batch_size)
        bucketed += [rows[chunk] for chunk in deal_rows(lengths[rows], sizes)]
    return shuffled, bucketed


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_config(BenchConfig, __doc__.split("\n\n")[0], argv)
    if min(cfg.max_len, cfg.batch_size, cfg.window) < 1:
        raise SystemExit("--max-len, --batch-size and --window must be >= 1")
    sequences = pq.read_table(Path(cfg.data) / SEQUENCES_DIR, columns=["item_index"])["item_index"].to_pylist()
    lengths = torch.tensor([int(np.count_nonzero(train_pair(np.asarray(s), cfg.max_len, cfg.train_on_valid)[1]))
                            for s in sequences])
    shuffled, bucketed = epoch_batches(len(lengths), cfg.batch_size, cfg.window, lengths, cfg.seed)
    rows = [{"batches": name, **quarter_stats(lengths, position_weights(lengths, b))}
            for name, b in (("shuffled", shuffled), (f"bucketed, window {cfg.window}", bucketed))]
    table = "\n".join([
        f"`{cfg.data}`, {len(lengths)} users, batch {cfg.batch_size}, max_len {cfg.max_len}; shortest quarter "
        f"<= {int(lengths.sort().values[len(lengths) // 4 - 1])} positions", "",
        "| batches | per-position weight, shortest / longest quarter | shortest quarter's share of the "
        "objective | of the positions |", "|---|---|---|---|",
        *(f"| {r['batches']} | {r['weight_ratio']:.2f}x | {r['objective_share']:.1%} | {r['position_share']:.1%} |"
          for r in rows)]) + "\n"
    write_outputs(cfg.output, "bucket_weights", {"config": dataclasses.asdict(cfg), "rows": rows}, table)
    return rows


if __name__ == "__main__":
    main()
