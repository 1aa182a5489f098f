"""Stage 2: distil a shallow student from the frozen teacher (SLMRec).

The student is the teacher's architecture with fewer layers and FRESH projections and
LoRA (or teacher-initialised with --student-init teacher, an option to measure). Loss:
CE + sum over B blocks of [cos_weight * (1 - cos) + l2_weight * ||h_s - h_t||] between
paired teacher/student block outputs + ms_weight * CE of B-1 extra score heads on the
student's intermediate blocks (+ kd_weight * T^2 * KL of the teacher's logits, our
addition, off by default). Every term is logged separately.

Submit to a running cluster (or use `python` alone for a local run):
    ray job submit --working-dir . -- python jobs/distill.py --data /mnt/shared/ml-1m \\
        --teacher /mnt/shared/runs/teacher --student-layers 4 --output /mnt/shared/runs/student
(a submitted job runs in an uploaded copy of the repository: give it absolute paths on
storage every node sees)
Without --teacher the teacher is trained first (jobs/train_teacher.py, same backbone
flags) into OUTPUT/teacher:
    python jobs/distill.py --data out/ml-1m --output runs/kd --backbone scratch \\
        --layers 8 --hidden 256 --heads 4 --student-layers 2 --blocks 2

The teacher runs online inside the training workers (no_grad): see README for the
measurement behind that choice. Writes OUTPUT/best/ (the student), metrics.json,
REPORT.md, report.json and PNGs (loss terms, metrics, layer probe).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common.flags import DataFlags, ItemTableFlags, TrainFlags, inherited_settings  # noqa: E402
from jobs.common.job_paths import refuse_relative_paths_if_submitted  # noqa: E402
from jobs.common.model_spec import resolve_model_dir  # noqa: E402
from slmrec.backbones import BackboneConfig  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402


@dataclass(kw_only=True)
class DistillConfig(DataFlags, TrainFlags, ItemTableFlags):
    teacher: Optional[str] = field(None, help="teacher: a jobs/train_teacher.py output directory (or its best/); "
                                              "without it the teacher is trained first from the backbone flags")
    student_layers: int = field(4, help="decoder layers of the student")
    blocks: int = field(4, help="blocks B: teacher depths (M/B)*i paired with student depths (N/B)*i")
    cos_weight: float = field(1.0, help="feature direction alignment weight (1 - cos per block)")
    l2_weight: float = field(0.1, help="feature norm regularisation weight")
    ms_weight: float = field(1.0, help="multiple supervision weight (B-1 extra score heads)")
    kd_weight: float = field(0.0, help="logit distillation weight: T^2 * KL(teacher || student) over all items "
                                       "(not in the paper, whose student never sees the teacher's logits)")
    kd_temperature: float = field(1.0, help="softmax temperature T of the logit distillation term")
    norm_mode: Literal["distance", "norm"] = field("distance", help="norm term: ||h_s - h_t|| (reference code) "
                                                                  "or | ||h_s|| - ||h_t|| | (paper's wording)")
    student_init: Literal["fresh", "teacher"] = field("fresh", help="fresh weights (the paper) or the teacher's "
                                                                  "first layers and projections")
    student_finetuning: Literal["teacher", "full"] = field(
        "teacher", help="the student's backbone training: as the teacher's (LoRA for a pretrained backbone, the "
                        "paper) or full (every weight of its few layers; with --student-init teacher the teacher's "
                        "LoRA adapters are merged into the copied layers)")
    warmup_steps: int = field(50, help="linear warm-up steps before cosine decay")
    epochs: int = field(5, help="student training epochs")
    teacher_epochs: int = field(3, help="teacher epochs when the teacher is trained first")
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(layers=8, hidden=128, heads=4),
                                     help="teacher backbone when no --teacher is given")
    prompt: bool = field(True, help="teacher trained first: wrap items in a text instruction if a tokenizer exists")
    probe: bool = field(True, help="run the layer-redundancy probe on the teacher for the report")
    probe_users: int = field(2048, help="validation (and as many training) users the probe reads")
    probe_full_backbone: bool = field(False, help="also probe every layer of the untruncated pretrained backbone "
                                                  "(frozen, teacher's input projection; costs a full-depth "
                                                  "forward of 2 x --probe-users histories, in bf16 "
                                                  "under --bf16-autocast)")


def student_config(teacher_config: dict, student_layers: int, aux_heads: int, finetuning: str) -> dict:
    backbone = dict(teacher_config["backbone"], layers=student_layers)
    if finetuning == "full":
        backbone["lora"] = "off"
    return dict(teacher_config, backbone=backbone, aux_heads=aux_heads)


def build_task(args: dict):
    """Runs in each Ray Train worker: frozen teacher + fresh (or teacher-initialised) student."""
    from slmrec.losses import DistillWeights
    from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender, init_from_teacher
    from slmrec.tasks import DistillTask

    teacher = SeqRecommender.load(args["teacher"])
    config = RecommenderConfig(**student_config(teacher.config.to_dict(), args["student_layers"], args["aux_heads"],
                                                args["student_finetuning"]))
    student = build_recommender(config, teacher.item_table, seed=args["seed"])
    if args["student_init"] == "teacher":
        init_from_teacher(student, teacher)
    return DistillTask(student, teacher=teacher, weights=DistillWeights(**args["weights"]),
                       num_blocks=args["blocks"])


def loss_weights(config: DistillConfig) -> dict:
    """The keyword arguments of slmrec.losses.DistillWeights the flags ask for."""
    return {"cos": config.cos_weight, "l2": config.l2_weight, "ms": config.ms_weight,
            "norm_mode": config.norm_mode, "kd": config.kd_weight, "kd_temperature": config.kd_temperature}


def task_args(config: DistillConfig, teacher_dir: Path) -> dict:
    """The picklable arguments of `build_task` (shared with jobs/tune.py's trials)."""
    return {"teacher": str(teacher_dir), "student_layers": config.student_layers, "blocks": config.blocks,
            "aux_heads": config.blocks - 1 if config.ms_weight > 0 else 0, "weights": loss_weights(config),
            "student_init": config.student_init, "student_finetuning": config.student_finetuning,
            "seed": config.seed}


def validate(config: DistillConfig, teacher_dir: Path) -> int:
    """Fail before any worker starts: teacher files, depths and blocks. Returns the teacher depth."""
    from jobs.common.validation_leak import refuse_validation_leak
    from slmrec.blocks import pair_blocks
    from slmrec.checkpoint import load_meta

    try:
        meta = load_meta(teacher_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"--teacher {config.teacher}: {e}; expected the output of jobs/train_teacher.py") from e
    depth = int(meta["backbone_config"]["num_hidden_layers"])
    if config.student_layers > depth:
        raise SystemExit(f"--student-layers {config.student_layers} is deeper than the teacher ({depth} layers)")
    try:
        pair_blocks(depth, config.student_layers, config.blocks)
    except ValueError as e:
        raise SystemExit(f"--blocks {config.blocks}: {e}") from e
    if config.ms_weight > 0 and config.blocks < 2:
        raise SystemExit("--ms-weight > 0 needs --blocks >= 2 (the extra heads sit on the first B-1 blocks)")
    refuse_validation_leak(teacher_dir, "--teacher", validated=not config.train_on_valid)
    check_teacher_items(teacher_dir, config.data)
    return depth


def check_teacher_items(teacher_dir: Path, data: str) -> None:
    """Exit when the teacher was trained on other items than `data` holds: its scores and
    item table would stand for other items, without any error."""
    from pipelines.prepared import num_items, vocabulary_digest
    from slmrec.recommend import check_vocabulary

    try:
        check_vocabulary(teacher_dir, num_items(data), vocabulary_digest(data))
    except ValueError as e:
        raise SystemExit(f"--teacher: {e}") from e


def ensure_teacher(config: DistillConfig, output: Path) -> Path:
    if config.teacher:
        return resolve_model_dir(config.teacher)
    from jobs.train_teacher import TeacherConfig, run as run_teacher

    teacher_out = output / "teacher"
    if not (teacher_out / "best" / "meta.json").is_file() or not (teacher_out / "metrics.json").is_file():
        print(f"[distill] no --teacher: training one first into {teacher_out}", flush=True)
        # Every teacher setting comes from the distillation flags of the same name (the
        # teacher's flags are a subset of them), except where the teacher run differs;
        # fault injection is for the student run alone.
        own = {"output", "epochs", "warmup_steps", "run_name", "fail_after_steps"}
        run_teacher(TeacherConfig(output=str(teacher_out), epochs=config.teacher_epochs,
                                  warmup_steps=max(config.warmup_steps, 1),
                                  run_name=f"{config.run_name}-teacher" if config.run_name else None,
                                  **inherited_settings(config, TeacherConfig, own)))
    return teacher_out / "best"


def run(config: DistillConfig) -> Path:
    from jobs.common.data import load_splits
    from jobs.common.distill_report import write_distill_report
    from jobs.common.ray_runtime import init_local_ray
    from jobs.common.trainer import fit, make_spec, run_name_for

    output = Path(config.output).resolve()
    # A given teacher is checked before Ray starts; one trained here, once it exists.
    if config.teacher:
        validate(config, resolve_model_dir(config.teacher))
    init_local_ray()
    teacher_dir = ensure_teacher(config, output)
    if not config.teacher:
        validate(config, teacher_dir)
    splits = load_splits(config.data, config.max_len, config.valid_fraction, config.train_on_valid)
    spec = make_spec(config, str(output), splits.users - splits.too_short)
    fit(config, spec, build_task, task_args(config, teacher_dir), splits.as_dict(),
        run_name_for(config.output, config.run_name))
    write_distill_report(config, output, teacher_dir)
    print(f"[distill] student -> {output / 'best'}; report -> {output / 'REPORT.md'}", flush=True)
    return output


def main(argv: list[str] | None = None) -> None:
    config = parse_config(DistillConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "distill")
    run(config)


if __name__ == "__main__":
    main()
