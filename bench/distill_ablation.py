"""Ablation of the distillation losses, same teacher, data and seed:
CE only, + feature alignment (cos + l2), + multiple supervision (all three), and our
logit-distillation term (not in the paper) alone with CE and on top of all three.

    python bench/distill_ablation.py --data out/ml-1m-50 --teacher runs/ml1m/teacher \\
        --student-layers 2 --blocks 2 --epochs 5 --output runs/ablation

Each variant is a full jobs/distill.py run (its own REPORT.md); this script prints and
writes ablation.md / ablation.json with the test metrics side by side.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common.report import markdown_table  # noqa: E402
from slmrec.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402

VARIANTS = {
    "CE only": {"cos_weight": 0.0, "l2_weight": 0.0, "ms_weight": 0.0},
    "+ alignment (cos, l2)": {"cos_weight": 1.0, "l2_weight": 0.1, "ms_weight": 0.0},
    "+ multiple supervision": {"cos_weight": 1.0, "l2_weight": 0.1, "ms_weight": 1.0},
    "CE + logit distillation only": {"cos_weight": 0.0, "l2_weight": 0.0, "ms_weight": 0.0, "kd_weight": 1.0},
    "all three + logit distillation": {"cos_weight": 1.0, "l2_weight": 0.1, "ms_weight": 1.0, "kd_weight": 1.0},
}


@dataclass(kw_only=True)
class AblationConfig:
    data: str = field(help="prepared data directory")
    teacher: str = field(help="teacher directory (jobs/train_teacher.py output)")
    output: str = field(help="one sub-directory per variant goes here")
    student_layers: int = field(2, help="student depth")
    blocks: int = field(2, help="distillation blocks")
    epochs: int = field(5, help="student epochs")
    max_len: int = field(50, help="history length")
    batch_size: int = field(64, help="micro-batch")
    lr: float = field(1e-3, help="learning rate")
    warmup_steps: int = field(50, help="linear warm-up steps")
    student_init: str = field("fresh", help="'fresh' or 'teacher' (see jobs/distill.py)")
    valid_fraction: float = field(1.0, help="share of users validated each epoch")
    torch_threads: int = field(0, help="torch threads per worker (0: CPUs reserved for it)")
    seed: int = field(0, help="same seed for every variant")


def main(argv: list[str] | None = None) -> None:
    from jobs.distill import DistillConfig, run

    config = parse_config(AblationConfig, __doc__, argv)
    out = Path(config.output)
    rows = []
    for name, weights in VARIANTS.items():
        run_dir = out / weights_dir(weights)
        if not (run_dir / "metrics.json").is_file():
            run(DistillConfig(data=config.data, teacher=config.teacher, output=str(run_dir),
                              student_layers=config.student_layers, blocks=config.blocks, epochs=config.epochs,
                              max_len=config.max_len, batch_size=config.batch_size, lr=config.lr,
                              warmup_steps=config.warmup_steps, student_init=config.student_init,
                              valid_fraction=config.valid_fraction, torch_threads=config.torch_threads,
                              seed=config.seed, probe=False, **weights))
        final = json.loads((run_dir / "metrics.json").read_text())["final"]
        rows.append({"variant": name, **{f"{p} {m}": final[f"test_{p}/{m}"]
                                         for p in ("full", "sampled999") for m in ("NDCG@10", "HR@10")}})
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    atomic_write_json(out / "ablation.json", rows)
    atomic_write_text(out / "ablation.md", f"# Distillation ablation\n\n{table}\n")
    print(table)


def weights_dir(weights: dict[str, float]) -> str:
    name = "cos{cos_weight}_l2{l2_weight}_ms{ms_weight}".format(**weights)
    # Runs without the kd term keep the names they had before it existed (and are reused).
    return name + (f"_kd{weights['kd_weight']}" if weights.get("kd_weight") else "")


if __name__ == "__main__":
    main()
