"""Tiny inputs for the cluster and resilience tests: prepared data (tests/prepared_data.py)
and an untrained teacher checkpoint written directly (no Ray), so a distillation job can
start at once. `python tests/cluster_inputs.py DIR` writes DIR/prep and DIR/teacher
(used by cluster/local_two_node.sh)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from slmrec.backbones import BackboneConfig  # noqa: E402
from slmrec.model import RecommenderConfig, build_recommender  # noqa: E402
from tests.prepared_data import write_prepared  # noqa: E402

MAX_LEN = 12
# Flags of a distillation that finishes in seconds of training on the data above.
TINY_DISTILL_FLAGS = ["--student-layers", "1", "--blocks", "1", "--ms-weight", "0", "--batch-size", "16",
                      "--warmup-steps", "2", "--max-len", str(MAX_LEN), "--no-probe", "--log-every", "1"]


def write_tiny_teacher(directory: Path, prepared: Path, layers: int = 2, seed: int = 0) -> Path:
    """An untrained 2-layer scratch teacher over the prepared item vocabulary, saved like a
    jobs/train_teacher.py output (DIR/best). Distillation only needs a fixed teacher."""
    num_items = int(json.loads((prepared / "stats.json").read_text())["items"])
    table = torch.randn(num_items + 1, 16, generator=torch.Generator().manual_seed(seed))
    table[0] = 0
    config = RecommenderConfig(num_items=num_items, item_dim=16, max_len=MAX_LEN,
                               backbone=BackboneConfig(name="scratch", layers=layers, hidden=16, heads=2))
    build_recommender(config, table, seed=seed).save(directory / "best")
    return directory


def write_inputs(directory: Path) -> tuple[Path, Path]:
    prepared = write_prepared(directory / "prep")
    return prepared, write_tiny_teacher(directory / "teacher", prepared)


if __name__ == "__main__":
    prep, teacher = write_inputs(Path(sys.argv[1]).resolve())
    print(prep, teacher)
