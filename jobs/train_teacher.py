"""Stage 1: fine-tune the teacher, an LLM decoder truncated to K layers that encodes the
user's item sequence (frozen item table in, scores over all items out).

Local run on a small scratch backbone (starts a bounded local Ray):
    python jobs/train_teacher.py --data out/ml-1m --output runs/teacher \\
        --backbone scratch --layers 8 --hidden 256 --heads 4 --epochs 3 --num-workers 1
The real pretrained backbone (SmolLM2-135M, LoRA on gate/up/down):
    python jobs/train_teacher.py --data out/ml-1m --output runs/teacher --backbone smollm2-135m --layers 8
On a cluster (DeepSpeed ZeRO-2 on GPUs):
    ray job submit --working-dir . -- python jobs/train_teacher.py --data ... --output ... \\
        --num-workers 8 --use-gpu --deepspeed-config cluster/deepspeed/zero2.json

Without --item-table the job first runs stage 0 (jobs/pretrain_items.py) into
OUTPUT/items. Writes OUTPUT/best/ (the teacher, loadable with SeqRecommender.load),
metrics.json, REPORT.md, report.json and training_curve.png. Rerunning the same command
resumes from the last checkpoint.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common.flags import DataFlags, ItemTableFlags, TrainFlags, inherited_settings  # noqa: E402
from jobs.common.job_paths import refuse_relative_paths_if_submitted  # noqa: E402
from slmrec.backbones import BackboneConfig  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402


@dataclass(kw_only=True)
class TeacherConfig(DataFlags, TrainFlags, ItemTableFlags):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(layers=8, hidden=128, heads=4),
                                     help="decoder backbone")
    prompt: bool = field(True, help="wrap the items in a text instruction when the backbone has a tokenizer")


def build_task(args: dict):
    """Runs in each Ray Train worker: the recommender with the frozen item table."""
    from jobs.pretrain_items import load_item_table
    from slmrec.model import RecommenderConfig, build_recommender
    from slmrec.tasks import NextItemTask

    config = RecommenderConfig(**args["model"])
    table = load_item_table(args["item_table"], config.num_items, config.vocabulary)
    return NextItemTask(build_recommender(config, table, seed=args["seed"]))


def ensure_item_table(config: TeacherConfig, output: Path) -> str:
    """The item table to freeze: the given one, or stage 0 trained now into OUTPUT/items."""
    if config.item_table:
        from jobs.common.validation_leak import refuse_validation_leak

        refuse_validation_leak(config.item_table, "--item-table", validated=not config.train_on_valid)
        return str(Path(config.item_table).resolve())
    from jobs.pretrain_items import PretrainItemsConfig, run as run_items

    items_out = output / "items"
    if not (items_out / "item_table").is_dir():
        print(f"[teacher] no --item-table: training SASRec first into {items_out}", flush=True)
        # Data, resources, precision and evaluation settings carry over; the optimiser's
        # (learning rate, weight decay, accumulation) and SASRec's architecture stay its
        # defaults, and fault injection is for the teacher run alone.
        own = {"output", "epochs", "lr", "weight_decay", "grad_accum", "run_name", "fail_after_steps",
               "blocks", "heads", "dropout", "cosine_temperature"}
        run_items(PretrainItemsConfig(output=str(items_out), epochs=config.item_epochs, dropout=config.item_dropout,
                                      run_name=f"{config.run_name}-items" if config.run_name else None,
                                      **inherited_settings(config, PretrainItemsConfig, own)))
    return str(items_out)


def model_args(config: TeacherConfig, num_items: int, backbone: BackboneConfig | None = None,
               aux_heads: int = 0) -> dict:
    from pipelines.prepared import vocabulary_digest
    from slmrec.config import to_dict

    # The digest goes into every checkpoint (students inherit it), so serving and scoring
    # can refuse data whose item indices mean other items.
    return {"num_items": num_items, "item_dim": config.item_dim, "backbone": to_dict(backbone or config.backbone),
            "aux_heads": aux_heads, "prompt": config.prompt, "max_len": config.max_len,
            "vocabulary": vocabulary_digest(config.data)}


def run(config: TeacherConfig) -> Path:
    from jobs.common.data import load_splits
    from jobs.common.ray_runtime import init_local_ray
    from jobs.common.report import write_training_report
    from jobs.common.trainer import fit, make_spec, run_name_for
    from jobs.pretrain_items import check_item_table

    output = Path(config.output).resolve()
    if not config.backbone.is_scratch:
        # Resolve (and for smollm2-135m convert, once) on the driver: a bad path fails
        # here, and the workers find the converted checkpoint in the cache.
        from slmrec.backbones import resolve_checkpoint

        try:
            resolve_checkpoint(config.backbone)
        except FileNotFoundError as e:
            raise SystemExit(f"--backbone: {e}") from e
    init_local_ray()
    item_table = ensure_item_table(config, output)
    splits = load_splits(config.data, config.max_len, config.valid_fraction, config.train_on_valid)
    task_args = {"model": model_args(config, splits.num_items), "item_table": item_table, "seed": config.seed}
    try:  # before the workers start: a table of other data fails here, not in each worker
        check_item_table(item_table, splits.num_items, task_args["model"]["vocabulary"])
    except ValueError as e:
        raise SystemExit(f"--item-table: {e}") from e
    spec = make_spec(config, str(output), splits.users - splits.too_short)
    fit(config, spec, build_task, task_args, splits.as_dict(), run_name_for(config.output, config.run_name))
    from slmrec.model import SeqRecommender

    counts = SeqRecommender.load(output / "best").parameter_counts()
    write_training_report(output, f"Stage 1: teacher ({config.backbone.name}, {config.backbone.layers} layers)",
                          extra={"parameters": counts, "item_table": item_table},
                          sampled_negatives=config.sampled_negatives)
    print(f"[teacher] model -> {output / 'best'}; report -> {output / 'REPORT.md'}", flush=True)
    return output


def main(argv: list[str] | None = None) -> None:
    config = parse_config(TeacherConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "train_teacher")
    run(config)


if __name__ == "__main__":
    main()
