"""The whole pipeline, end to end, on embedded defaults (what `make demo` runs):

    import (MovieLens-100k, shipped by the recbole package) -> prepare (Ray Data)
    -> item table (SASRec) -> teacher -> distilled student (Ray Train + DeepSpeed)
    -> offline top-k for every user (Ray Data) -> reports

    python jobs/pipeline.py                       # local Ray, about 7 minutes on 2 cores
    python jobs/pipeline.py --dataset ml-1m --max-len 200 --teacher-layers 8 --hidden 256 \\
        --student-layers 2 --epochs 20 --output runs/ml-1m
    ray job submit --working-dir . -- python jobs/pipeline.py --output /shared/runs/demo

Each stage is the same code as its own job (jobs/import_data.py, prepare.py,
distill.py, score.py), called with the flags shown in the log, so any stage can be
rerun alone. Finished stages are skipped when the pipeline is rerun; training stages
resume from their last checkpoint.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common.job_paths import refuse_relative_paths_if_submitted  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402


@dataclass(kw_only=True)
class PipelineConfig:
    output: str = field("runs/demo", help="root directory of every stage's output")
    dataset: Literal["ml-100k", "ml-1m"] = field("ml-100k", help="bundled dataset to import")
    max_len: int = field(50, help="most recent items per user kept and fed to the models")
    min_rating: float | None = field(None, help="drop interactions rated below this (paper: 3)")
    backbone: str = field("scratch", help="teacher backbone: scratch, smollm2-135m or a local HF checkpoint")
    teacher_layers: int = field(4, help="teacher decoder layers")
    student_layers: int = field(1, help="student decoder layers")
    blocks: int = field(1, help="distillation blocks (must divide both depths)")
    hidden: int = field(64, help="scratch backbone hidden size")
    heads: int = field(2, help="scratch backbone attention heads")
    # The defaults train long enough on MovieLens-100k (29 steps an epoch) for every model to
    # learn: 10 / 3 / 3 epochs of batch 64 at lr 1e-3 left all three at popularity level
    # (test NDCG@10 0.014 / 0.015 / 0.015; now 0.024 / 0.037 / 0.029, ~7 min on 2 cores).
    item_epochs: int = field(20, help="SASRec epochs (item table)")
    item_dropout: float = field(0.2, help="SASRec dropout (the paper's ~0.5 learns slower on this little data)")
    teacher_epochs: int = field(8, help="teacher epochs")
    epochs: int = field(5, help="student epochs")
    batch_size: int = field(32, help="micro-batch per worker")
    lr: float = field(2e-3, help="peak learning rate of the teacher and the student")
    num_workers: int = field(1, help="Ray Train workers per training stage")
    num_cpus: int = field(2, help="CPUs of the local Ray instance (ignored on a cluster); training "
                                  "needs one per worker and one left for reading data")
    k: int = field(20, help="items recommended per user by the offline scoring stage")


def _call(name: str, main, argv: list[str]) -> None:
    print(f"\n[pipeline] {name}: python jobs/{name}.py {shlex.join(argv)}", flush=True)
    main(argv)


def run(config: PipelineConfig) -> Path:
    from jobs import distill, import_data, prepare, score
    from jobs.common.ray_runtime import init_local_ray
    from pipelines.scoring import SUMMARY_FILE

    root = Path(config.output).resolve()
    logs, prepared, kd, scores = root / "logs", root / "prepared", root / "distill", root / "scores"
    init_local_ray(num_cpus=config.num_cpus)
    if not any(logs.glob("*.parquet")):
        _call("import_data", import_data.main, ["--dataset", config.dataset, "--output", str(logs)])
    if not (prepared / "stats.json").is_file():
        argv = ["--input", str(logs), "--output", str(prepared), "--max-len", str(config.max_len)]
        if config.min_rating is not None:
            argv += ["--min-rating", str(config.min_rating)]
        _call("prepare", prepare.main, argv)
    if not (kd / "REPORT.md").is_file():
        # Student ms-heads need at least two blocks; with one block the ms term is off.
        ms = ["--ms-weight", "0"] if config.blocks < 2 else []
        _call("distill", distill.main, [
            "--data", str(prepared), "--output", str(kd), "--max-len", str(config.max_len),
            "--backbone", config.backbone, "--layers", str(config.teacher_layers),
            "--hidden", str(config.hidden), "--heads", str(config.heads),
            "--student-layers", str(config.student_layers), "--blocks", str(config.blocks), *ms,
            "--item-epochs", str(config.item_epochs), "--item-dropout", str(config.item_dropout),
            "--teacher-epochs", str(config.teacher_epochs), "--epochs", str(config.epochs),
            "--batch-size", str(config.batch_size), "--lr", str(config.lr),
            "--num-workers", str(config.num_workers)])
    if not (scores / SUMMARY_FILE).is_file():
        _call("score", score.main, ["--model", str(kd / "best"), "--data", str(prepared),
                                    "--output", str(scores), "--k", str(config.k)])
    print("\n[pipeline] done. Reports:")
    for stage in (kd / "teacher" / "items", kd / "teacher", kd):
        print(f"  {stage / 'REPORT.md'}")
    print(f"  top-{config.k} per user: {scores}/*.parquet")
    return root


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PipelineConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "pipeline")
    run(config)


if __name__ == "__main__":
    main()
