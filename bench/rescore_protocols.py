r"""Re-score saved models on a prepared directory's test items under every full-ranking
protocol: history competing, and history excluded (the last `--mask-len` items, as
generative-recommenders excludes its 200-item past_ids), side by side. For checkpoints
trained before every report carried both; the training jobs report both themselves now.

    python bench/rescore_protocols.py --model runs/ml1m50/items-tov/best --data out/ml-1m-full200 \
        --output out/bench/rescore
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from pipelines.prepared import SEQUENCES_DIR
from slmrec.batching import to_arrays
from bench.outputs import write_outputs
from slmrec.checkpoint import load_meta
from slmrec.config import field, parse_config
from slmrec.metrics import MetricSums, full_ranking_ranks
from slmrec.model import SeqRecommender
from slmrec.sasrec import CHECKPOINT_FORMAT as SASREC_FORMAT
from slmrec.sasrec import SASRec
from slmrec.tasks import NextItemTask, SASRecTask, Task

METRICS = ("NDCG@10", "HR@10", "HR@1", "MRR")


@dataclasses.dataclass
class BenchConfig:
    model: tuple[str, ...] = field(help="checkpoint directories (SASRec or recommender, e.g. RUN/best)")
    data: str = field(help="prepared directory the models were trained on")
    mask_len: int = field(200, help="history items excluded under the masked protocol (most recent)")
    batch_size: int = field(256, help="users scored at a time")
    threads: int = field(2, help="torch threads")
    output: str | None = field(None, help="directory for rescore_protocols.json and .md")


def load_task(directory: str) -> Task:
    if load_meta(directory).get("format") == SASREC_FORMAT:
        return SASRecTask(SASRec.load(directory).eval())
    return NextItemTask(SeqRecommender.load(directory).eval())


def rescore(directory: str, sequences: list[list[int]], cfg: BenchConfig) -> dict[str, Any]:
    task = load_task(directory)
    max_len = task.model.max_len if isinstance(task.model, SASRec) else task.model.config.max_len
    sums = {"full": MetricSums(), "full_masked": MetricSums()}
    with torch.no_grad():
        table = task.item_table().float()
        for start in range(0, len(sequences), cfg.batch_size):
            chunk = sequences[start:start + cfg.batch_size]
            batch = to_arrays(chunk, "test", max_len)
            history = torch.from_numpy(to_arrays(chunk, "test", cfg.mask_len)["items"])
            users = task.user_vectors(torch.from_numpy(batch["items"])).float()
            targets = torch.from_numpy(batch["targets"])
            sums["full"].add(full_ranking_ranks(users, table, targets))
            sums["full_masked"].add(full_ranking_ranks(users, table, targets, history_items=history))
    return {"model": directory, "max_len": max_len, "users": len(sequences),
            **{f"{label}/{m}": s.result()[m] for label, s in sums.items() for m in METRICS}}


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]]) -> str:
    lines = [f"`{cfg.data}`, test item = last, full ranking; masked = the last {cfg.mask_len} history items "
             "excluded", "", "| model | items read | " + " | ".join(METRICS) + " | "
             + " | ".join(f"masked {m}" for m in METRICS) + " |", "|---|---|" + "---|" * 2 * len(METRICS)]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['max_len']} | " + " | ".join(f"{r[f'full/{m}']:.4f}" for m in METRICS)
                     + " | " + " | ".join(f"{r[f'full_masked/{m}']:.4f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_config(BenchConfig, __doc__.split("\n\n")[0], argv)
    if cfg.mask_len < 1 or cfg.batch_size < 1:
        raise SystemExit("--mask-len and --batch-size must be >= 1")
    torch.set_num_threads(cfg.threads)
    sequences = pq.read_table(Path(cfg.data) / SEQUENCES_DIR, columns=["item_index"])["item_index"].to_pylist()
    rows = [rescore(directory, sequences, cfg) for directory in cfg.model]
    write_outputs(cfg.output, "rescore_protocols", {"config": dataclasses.asdict(cfg), "rows": rows},
                  markdown(cfg, rows))
    return rows


if __name__ == "__main__":
    main()
