"""Interaction logs in Parquet: find the files, check them, normalise their rows.

Everything that can be wrong with the input *as a whole* (no files, an unreadable file,
a missing column, a column of the wrong type, types that differ between files, no rows)
is found here on the driver from Parquet footers alone, before any work starts, and
reported with the file and the problem. Only null cells are row-level problems; they
are counted, not fatal (see `reject_rows`).

Canonical columns after `normalize`: user_id and item_id (int64 or string, whichever
kind the input has), timestamp (int64: integer input as is, Parquet timestamps as
integers in their own unit), and rating (float64) when a rating filter is asked for.
"""
from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

USER, ITEM, TIME, RATING = "user_id", "item_id", "timestamp", "rating"

# Order matters: a row with several null cells is counted under the first reason only,
# so the reasons add up to the number of rejected rows.
REJECT_REASONS = ("null_user_id", "null_item_id", "null_timestamp", "null_rating",
                  "rating_below_min")


class LogError(ValueError):
    """The input log cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ColumnNames:
    """Names of the log's columns in the input files."""

    user: str = USER
    item: str = ITEM
    timestamp: str = TIME
    rating: str = RATING


@dataclass(frozen=True)
class LogSchema:
    """What validation learnt about the input: its files, their rows, and the kinds of
    the id columns (the output keeps the original id type)."""

    files: tuple[str, ...]
    num_rows: int
    row_group_rows: tuple[tuple[int, ...], ...]  # per file, rows of each row group
    user_type: pa.DataType
    item_type: pa.DataType
    with_rating: bool

    @property
    def canonical_user_type(self) -> pa.DataType:
        return _canonical_id_type(self.user_type)

    @property
    def canonical_item_type(self) -> pa.DataType:
        return _canonical_id_type(self.item_type)


def resolve_inputs(spec: str | os.PathLike | list[str]) -> list[str]:
    """Expand a Parquet file, a directory (searched recursively for *.parquet, skipping
    hidden and `_`-prefixed folders and files such as Spark's _temporary/ or a killed
    prepare's .tmp directory) or a glob, or a list of those, into a sorted list of
    absolute paths (tasks on other nodes read them; a relative path means another folder
    there)."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[str] = []
    for one in specs:
        one = str(one)
        check_local_path(one)
        if glob.has_magic(one):
            matched = sorted(p for p in glob.glob(one, recursive=True) if os.path.isfile(p))
            if not matched:
                raise LogError(f"{one}: the glob matches no files")
            files.extend(matched)
        elif os.path.isdir(one):
            matched = sorted(str(p) for p in Path(one).rglob("*.parquet") if p.is_file()
                             and not _is_hidden(p.relative_to(one)))
            if not matched:
                raise LogError(f"{one}: directory holds no *.parquet files")
            files.extend(matched)
        elif os.path.isfile(one):
            files.append(one)
        else:
            raise LogError(f"{one}: no such file or directory")
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))


def check_local_path(path: str) -> None:
    """Refuse a URI: every stage reads and writes through the filesystem, so remote
    storage must be mounted (s3fs, NFS, a CSI volume) on every node."""
    if "://" in path:
        raise LogError(f"{path}: URIs are not supported; mount the storage on every node "
                       "and pass its local path")


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_id_type(t.value_type)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _typed(t: pa.DataType) -> bool:
    """False for Parquet's null type: a column with no values at all (an empty pandas
    shard, or every cell null), which says nothing about the column's kind; its rows are
    rejected as null rows like any other null cell."""
    return not pa.types.is_null(t)


def _id_kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _id_kind(t.value_type)
    return "integer" if pa.types.is_integer(t) else "string"


def _canonical_id_type(t: pa.DataType) -> pa.DataType:
    return pa.int64() if _id_kind(t) == "integer" else pa.string()


def _output_id_type(t: pa.DataType) -> pa.DataType:
    """The id type the output keeps: the input's integer width, or plain string."""
    if pa.types.is_dictionary(t):
        return _output_id_type(t.value_type)
    return t if pa.types.is_integer(t) else pa.string()


def _read_footer(path: str) -> tuple[pa.Schema, tuple[int, ...]]:
    try:
        meta = pq.ParquetFile(path).metadata
        return meta.schema.to_arrow_schema(), tuple(
            meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    except (OSError, pa.ArrowException) as e:
        raise LogError(f"{path}: cannot read as Parquet ({e})") from e


def _check_file(path: str, schema: pa.Schema, names: ColumnNames, with_rating: bool) -> None:
    wanted = [names.user, names.item, names.timestamp] + ([names.rating] if with_rating else [])
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise LogError(f"{path}: missing column(s) {missing}; columns are {schema.names} "
                       "(map other names with --user-column/--item-column/--timestamp-column"
                       "/--rating-column)")
    for col in (names.user, names.item):
        t = schema.field(col).type
        if _typed(t) and not _is_id_type(t):
            raise LogError(f"{path}: column {col!r} has type {t}; ids must be integers or strings")
    t = schema.field(names.timestamp).type
    if _typed(t) and not (pa.types.is_integer(t) or pa.types.is_timestamp(t)):
        raise LogError(f"{path}: column {names.timestamp!r} has type {t}; timestamps must be "
                       "integers (e.g. unix seconds) or Parquet timestamps")
    if with_rating:
        t = schema.field(names.rating).type
        if _typed(t) and not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise LogError(f"{path}: column {names.rating!r} has type {t}; a rating must be numeric")


def validate(files: list[str], names: ColumnNames, with_rating: bool,
             max_threads: int = 16) -> LogSchema:
    """Check every file's footer (schema and row count) without reading data.

    Fails fast with `LogError` naming the file: unreadable, missing column, wrong type,
    id kinds (integer vs string) that differ between files, or no rows at all."""
    if not files:
        raise LogError("no input files")
    with ThreadPoolExecutor(max_workers=min(max_threads, len(files))) as pool:
        footers = list(pool.map(_read_footer, files))
    first_kinds: dict[str, tuple[str, str]] = {}
    for path, (schema, _) in zip(files, footers):
        _check_file(path, schema, names, with_rating)
        kinds = {col: f"{_id_kind(schema.field(col).type)} ids" for col in (names.user, names.item)
                 if _typed(schema.field(col).type)}
        if _typed(schema.field(names.timestamp).type):
            # Timestamps of different units (or integers beside Parquet timestamps) would
            # compare as numbers of different scales and misorder every user's items.
            kinds[names.timestamp] = _time_kind(schema.field(names.timestamp).type)
        for col, kind in kinds.items():
            seen = first_kinds.setdefault(col, (kind, path))
            if seen[0] != kind:
                raise LogError(f"{path}: column {col!r} holds {kind} but {seen[1]} holds "
                               f"{seen[0]}; all files must use one kind")
    num_rows = sum(sum(rgs) for _, rgs in footers)
    if num_rows == 0:
        raise LogError(f"input is empty: {len(files)} file(s), 0 rows (first: {files[0]})")
    # The widest integer type among the files is the output type (int32 + int64 -> int64).
    user_type = _widest([s.field(names.user).type for s, _ in footers])
    item_type = _widest([s.field(names.item).type for s, _ in footers])
    return LogSchema(tuple(files), num_rows, tuple(rgs for _, rgs in footers),
                     user_type, item_type, with_rating)


def read_units(schema: LogSchema, rows_per_unit: int) -> list[dict]:
    """Pack the input into units of whole row groups of about `rows_per_unit` rows, the
    unit of parallel reading: a big file becomes several units, and small files share one
    (each unit is one write task, and each task writes a file per partition it touches,
    so 10,000 small files must not become 10,000 tasks). A unit is {"pieces": [{"path",
    "row_groups"}, ...]}, its pieces in file order."""
    units: list[dict] = []
    pieces: list[dict] = []
    rows = 0
    for path, rgs in zip(schema.files, schema.row_group_rows):
        for i, n in enumerate(rgs):
            if pieces and rows + n > rows_per_unit:
                units.append({"pieces": pieces})
                pieces, rows = [], 0
            if pieces and pieces[-1]["path"] == path:
                pieces[-1]["row_groups"].append(i)
            else:
                pieces.append({"path": path, "row_groups": [i]})
            rows += n
    if rows:
        units.append({"pieces": pieces})
    return units


def _time_kind(t: pa.DataType) -> str:
    if not pa.types.is_timestamp(t):
        return "integer timestamps"
    # Parquet stores zoned timestamps as UTC instants and naive ones as wall-clock time;
    # mixed, one file's rows would be shifted by the zone's offset against the other's.
    return f"timestamps in {t.unit}, " + ("UTC instants" if t.tz else "no time zone")


def _widest(types: list[pa.DataType]) -> pa.DataType:
    """One output type for an id column: the files' integer type when they agree,
    int64 when integer widths differ (or no file has a value), string for string ids."""
    out = {_output_id_type(t) for t in types if _typed(t)}
    return out.pop() if len(out) == 1 else pa.int64()


def read_columns(names: ColumnNames, with_rating: bool) -> list[str]:
    """The input columns the prepare stage reads (everything else is never loaded)."""
    return [names.user, names.item, names.timestamp] + ([names.rating] if with_rating else [])


def normalize(table: pa.Table, names: ColumnNames, schema: LogSchema) -> pa.Table:
    """Rename to the canonical column names and cast to the canonical types. A value the
    footers could not rule out but the cast cannot hold (a uint64 id of 2^63 or more, say)
    raises LogError naming its column."""
    casts = [(USER, names.user, lambda c: _cast_id(c, schema.canonical_user_type),
              "integer ids must fit in int64 (store larger ones, e.g. 64-bit hashes, as strings)"),
             (ITEM, names.item, lambda c: _cast_id(c, schema.canonical_item_type),
              "integer ids must fit in int64 (store larger ones, e.g. 64-bit hashes, as strings)"),
             (TIME, names.timestamp, _cast_time, "timestamps must fit in int64")]
    if schema.with_rating:
        casts.append((RATING, names.rating, lambda c: c.cast(pa.float64()), "ratings must be numbers"))
    out = {}
    for canonical, name, cast, rule in casts:
        try:
            out[canonical] = cast(table.column(name))
        except pa.ArrowInvalid as e:
            raise LogError(f"column {name!r}: {e}; {rule}") from e
    return pa.table(out)


def _cast_id(col: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(target)


def _cast_time(col: pa.ChunkedArray) -> pa.ChunkedArray:
    # Parquet timestamps become integers in their own unit (s, ms, us or ns).
    return col.cast(pa.int64())


def reject_rows(table: pa.Table, min_rating: float | None) -> tuple[pa.Table, dict[str, int]]:
    """Drop rows with a null user_id, item_id or timestamp (and, with a rating filter,
    a null, NaN or too-low rating); return the kept rows and the count per reason."""
    counts = dict.fromkeys(REJECT_REASONS, 0)
    tests = [("null_user_id", pc.is_valid(table[USER])),
             ("null_item_id", pc.is_valid(table[ITEM])),
             ("null_timestamp", pc.is_valid(table[TIME]))]
    if min_rating is not None:
        # NaN says "no rating" as null does; compared, it would be counted as too low.
        tests += [("null_rating", pc.fill_null(pc.invert(pc.is_nan(table[RATING])), False)),
                  ("rating_below_min",
                   pc.fill_null(pc.greater_equal(table[RATING], min_rating), True))]
    keep = None
    for reason, ok in tests:
        failing = pc.invert(ok) if keep is None else pc.and_(keep, pc.invert(ok))
        counts[reason] = int(pc.sum(failing).as_py() or 0)
        keep = ok if keep is None else pc.and_(keep, ok)
    return table.filter(keep), counts
