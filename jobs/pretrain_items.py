"""Stage 0: train SASRec on the prepared sequences and export its item table, which the
LLM stages (teacher and students) then use frozen, as input vocabulary and scoring table.

Local run (starts a bounded local Ray):
    python jobs/pretrain_items.py --data out/ml-1m --output runs/items --epochs 20
On a cluster:
    ray job submit --working-dir . -- python jobs/pretrain_items.py --data ... --output ...

Writes OUTPUT/item_table/ (safetensors + JSON), OUTPUT/best/ (the SASRec model),
OUTPUT/metrics.json, REPORT.md, report.json and training_curve.png. Rerunning the same
command resumes from the last checkpoint.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common.flags import DataFlags, TrainFlags  # noqa: E402
from jobs.common.job_paths import refuse_relative_paths_if_submitted  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402

ITEM_TABLE_DIR = "item_table"


@dataclass(kw_only=True)
class PretrainItemsConfig(DataFlags, TrainFlags):
    epochs: int = field(20, help="training epochs")
    batch_size: int = field(128, help="micro-batch of user sequences per worker and step")
    warmup_steps: int = field(20, help="linear warm-up steps before cosine decay")
    item_dim: int = field(128, help="item embedding width (the frozen table's width)")
    blocks: int = field(2, help="SASRec transformer blocks")
    heads: int = field(1, help="SASRec attention heads")
    dropout: float = field(0.5, help="SASRec dropout")
    cosine_temperature: float = field(
        0.0, help="0: dot-product logits (the paper); T > 0: cosine similarity / T between "
        "unit-length user states and item rows (generative-recommenders' SASRec uses 0.05); "
        "the exported table then holds unit rows")


def build_task(args: dict):
    """Runs in each Ray Train worker."""
    from slmrec.sasrec import SASRec
    from slmrec.tasks import SASRecTask

    return SASRecTask(SASRec(num_items=args["num_items"], dim=args["item_dim"], blocks=args["blocks"],
                             heads=args["heads"], dropout=args["dropout"], max_len=args["max_len"],
                             cosine_temperature=args["cosine_temperature"]))


def export_item_table(output: Path, num_items: int, vocabulary: str) -> Path:
    """OUTPUT/best (SASRec) -> OUTPUT/item_table, the file later stages read. `vocabulary`
    (pipelines.prepared.vocabulary_digest of the training data) lets them refuse data whose
    item indices mean other items."""
    from slmrec.checkpoint import save_checkpoint
    from slmrec.sasrec import SASRec

    model = SASRec.load(output / "best")
    table = model.item_table()
    if table.shape[0] != num_items + 1:
        raise ValueError(f"SASRec in {output / 'best'} has {table.shape[0] - 1} items, the data has {num_items}")
    return save_checkpoint(output / ITEM_TABLE_DIR, {"item_table": table},
                           {"format": "slmrec.ItemTable/1", "num_items": num_items, "item_dim": table.shape[1],
                            "vocabulary": vocabulary})


def check_item_table(path: str | Path, num_items: int, vocabulary: str = "") -> Path:
    """The item_table/ directory of a pretrain_items output (or that directory itself), once
    its JSON says it covers the prepared data's items: the same count and, where the table
    and the caller both have a digest, the same ids by index. Reads no tensors."""
    from slmrec.checkpoint import load_meta

    path = Path(path)
    directory = path / ITEM_TABLE_DIR if (path / ITEM_TABLE_DIR).is_dir() else path
    try:
        meta = load_meta(directory)
    except FileNotFoundError as e:
        raise ValueError(f"{directory}: not an item table written by jobs/pretrain_items.py ({e})") from e
    if meta.get("format") != "slmrec.ItemTable/1":
        raise ValueError(f"{directory}: not an item table written by jobs/pretrain_items.py")
    if meta["num_items"] != num_items:
        raise ValueError(f"item table {directory} covers {meta['num_items']} items but the prepared data has "
                         f"{num_items}: it was trained on other data")
    if vocabulary and meta.get("vocabulary") and meta["vocabulary"] != vocabulary:
        raise ValueError(f"item table {directory} was trained on other items than the prepared data's "
                         f"{num_items} (same count, other ids by index: prepared again?)")
    return directory


def load_item_table(path: str | Path, num_items: int, vocabulary: str = ""):
    """The frozen table from a pretrain_items output, checked as `check_item_table` does."""
    from slmrec.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(check_item_table(path, num_items, vocabulary))
    if "item_table" not in tensors:
        raise ValueError(f"{path}: not an item table written by jobs/pretrain_items.py")
    return tensors["item_table"]


def run(config: PretrainItemsConfig) -> Path:
    from jobs.common.data import load_splits
    from jobs.common.ray_runtime import init_local_ray
    from jobs.common.report import write_training_report
    from jobs.common.trainer import fit, make_spec, run_name_for
    from pipelines.prepared import vocabulary_digest

    init_local_ray()
    output = Path(config.output).resolve()
    splits = load_splits(config.data, config.max_len, config.valid_fraction, config.train_on_valid)
    train_rows = splits.users - splits.too_short
    print(f"[items] {splits.users} users ({splits.too_short} too short to split), {splits.num_items} items",
          flush=True)
    spec = make_spec(config, str(output), train_rows)
    task_args = {"num_items": splits.num_items, "item_dim": config.item_dim, "blocks": config.blocks,
                 "heads": config.heads, "dropout": config.dropout, "max_len": config.max_len,
                 "cosine_temperature": config.cosine_temperature}
    fit(config, spec, build_task, task_args, splits.as_dict(), run_name_for(config.output, config.run_name))
    table_dir = export_item_table(output, splits.num_items, vocabulary_digest(config.data))
    write_training_report(output, "Stage 0: SASRec item table",
                          sampled_negatives=config.sampled_negatives)
    print(f"[items] item table -> {table_dir}; report -> {output / 'REPORT.md'}", flush=True)
    return output


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PretrainItemsConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "pretrain_items")
    run(config)


if __name__ == "__main__":
    main()
