"""Should the teacher run online in the distillation workers, or should its block features
be precomputed once with Ray Data? Measured side by side in one run:

- T_teacher: the frozen teacher's no-grad forward with per-layer outputs (what online
  distillation adds to every step);
- T_student: one student training step (forward, all loss terms, backward, AdamW);
- the storage a precomputed feature set would need (bf16, every position, B blocks).

    python bench/teacher_online_cost.py --hidden 576 --heads 9 --kv-heads 3 --teacher-layers 8 \\
        --student-layers 2 --blocks 2 --seq-len 50 --batch-size 32

Online costs T_teacher / (T_teacher + T_student) of each distillation step; precomputing
saves that fraction per epoch and per Tune trial but needs the storage printed below and
a pass over the data per (teacher, max_len) pair.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmrec.backbones import BackboneConfig  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402
from slmrec.losses import DistillWeights  # noqa: E402
from slmrec.model import RecommenderConfig, build_recommender  # noqa: E402
from slmrec.tasks import DistillTask  # noqa: E402


@dataclass(kw_only=True)
class CostConfig:
    hidden: int = field(576, help="scratch backbone hidden size (SmolLM2-135M: 576)")
    heads: int = field(9, help="attention heads")
    kv_heads: int = field(3, help="key/value heads")
    teacher_layers: int = field(8, help="teacher depth")
    student_layers: int = field(2, help="student depth")
    blocks: int = field(2, help="distillation blocks")
    num_items: int = field(3416, help="items (ML-1M after 5-core: 3416)")
    seq_len: int = field(50, help="sequence length")
    batch_size: int = field(32, help="batch")
    users: int = field(6040, help="users, for the storage estimate (ML-1M: 6040)")
    repeats: int = field(5, help="timed repeats (median reported)")
    output: str = field("", help="optional JSON output path")


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(CostConfig, __doc__, argv)
    torch.manual_seed(0)
    table = torch.randn(cfg.num_items + 1, 128) * 0.1

    def model(layers: int, aux: int):
        backbone = BackboneConfig(layers=layers, hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads)
        return build_recommender(RecommenderConfig(num_items=cfg.num_items, backbone=backbone, aux_heads=aux,
                                                   max_len=cfg.seq_len), table)

    teacher, student = model(cfg.teacher_layers, 0), model(cfg.student_layers, cfg.blocks - 1)
    task = DistillTask(student, teacher=teacher, weights=DistillWeights(), num_blocks=cfg.blocks)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    items = torch.randint(1, cfg.num_items + 1, (cfg.batch_size, cfg.seq_len))
    batch = {"items": items, "targets": torch.randint(1, cfg.num_items + 1, (cfg.batch_size, cfg.seq_len))}

    def teacher_forward():
        with torch.no_grad():
            teacher(items, output_layers=True)

    def student_step_precomputed():
        # The student step without the teacher: what a precomputed feature set would leave.
        weights = task.weights
        task.weights = DistillWeights(cos=0.0, l2=0.0, ms=weights.ms)
        loss = task.loss(batch).total
        task.weights = weights
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def online_step():
        loss = task.loss(batch).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    t_teacher = _median_seconds(teacher_forward, cfg.repeats)
    t_student = _median_seconds(student_step_precomputed, cfg.repeats)
    t_online = _median_seconds(online_step, cfg.repeats)
    storage_gb = cfg.users * cfg.seq_len * cfg.blocks * cfg.hidden * 2 / 1e9
    result = {"teacher_forward_s": t_teacher, "student_step_s": t_student, "online_step_s": t_online,
              "teacher_share_of_online_step": t_teacher / t_online,
              "precomputed_features_gb_bf16": storage_gb, "config": vars(cfg)}
    print(f"| teacher fwd (s) | student step (s) | online step (s) | teacher share | precomputed features (GB, bf16) |")
    print("|---|---|---|---|---|")
    print(f"| {t_teacher:.3f} | {t_student:.3f} | {t_online:.3f} | {t_teacher / t_online:.0%} | {storage_gb:.2f} |")
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
