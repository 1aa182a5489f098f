"""Should the teacher run online in the distillation workers, or should its block features
be precomputed once with Ray Data? Measured side by side in one run:

- T_teacher: the frozen teacher's no-grad forward with per-layer outputs;
- T_precomputed: one student training step (forward, every loss term, backward, AdamW)
  reading the teacher's outputs from a precomputed set;
- T_online: the same step running the teacher itself, as the workers do;
- the storage a precomputed feature set would need (bf16, every position, B blocks).
The three take turns round by round, so load from other work hits them alike.

    python bench/teacher_online_cost.py --hidden 576 --heads 9 --kv-heads 3 --teacher-layers 8 \\
        --student-layers 2 --blocks 2 --seq-len 50 --batch-size 32

Precomputing saves (T_online - T_precomputed) / T_online of each distillation step, per
epoch and per Tune trial, but needs the storage printed below and a pass over the data
per (teacher, max_len, blocks).
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


class _Precomputed:
    """The teacher as a precomputed feature set: its outputs for the batch, read back."""

    def __init__(self, teacher, features):
        self.teacher, self.features = teacher, features

    def __call__(self, items, output_layers: bool = False):
        return self.features

    def __getattr__(self, name):
        return getattr(self.teacher, name)


def _interleaved_medians(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns round by round so that a change
    in machine load hits them alike; the first round warms up and is not counted."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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

    with torch.no_grad():
        features = teacher(items, output_layers=True)

    def teacher_forward():
        with torch.no_grad():
            teacher(items, output_layers=True)

    def student_step(source) -> None:
        task.teacher = source
        loss = task.loss(batch).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    # Precomputed features: every loss term as online, the teacher's outputs read, not computed.
    steps = {"teacher": teacher_forward, "precomputed": lambda: student_step(_Precomputed(teacher, features)),
             "online": lambda: student_step(teacher)}
    seconds = _interleaved_medians(steps, cfg.repeats)
    t_teacher, t_student, t_online = seconds["teacher"], seconds["precomputed"], seconds["online"]
    saved = (t_online - t_student) / t_online
    storage_gb = cfg.users * cfg.seq_len * cfg.blocks * cfg.hidden * 2 / 1e9
    result = {"teacher_forward_s": t_teacher, "precomputed_step_s": t_student, "online_step_s": t_online,
              "saved_by_precomputing": saved, "precomputed_features_gb_bf16": storage_gb, "config": vars(cfg)}
    print("| teacher fwd (s) | step, precomputed features (s) | step, online teacher (s) | "
          "saved by precomputing | precomputed features (GB, bf16) |")
    print("|---|---|---|---|---|")
    print(f"| {t_teacher:.3f} | {t_student:.3f} | {t_online:.3f} | {saved:.0%} | {storage_gb:.2f} |")
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
