"""bench/llama_forward_paths.py runs on a prompted LLaMA checkpoint, times every inference
and training path and finds the inference paths' states equal."""
from __future__ import annotations

import json

from bench.llama_forward_paths import INFER, TRAIN, main
from tests.tiny_llm import save_tiny_llama


def test_bench_times_every_path_on_equal_states(tmp_path):
    llm = save_tiny_llama(tmp_path / "llm")
    main(["--backbone", str(llm), "--layers", "2", "1", "--seq-lens", "3", "7", "--batch-size", "4",
          "--train-batch-size", "2", "--num-items", "20", "--rounds", "1", "--repeats", "1",
          "--output", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "llama_forward_paths.json").read_text())
    assert [(r["layers"], r["seq_len"]) for r in report["rows"]] == [(2, 3), (2, 7), (1, 3), (1, 7)]
    for row in report["rows"]:
        assert row["prompt_tokens"] > 0
        assert set(row["infer_seconds"]) == set(INFER) and set(row["train_seconds"]) == set(TRAIN)
        assert all(s > 0 for s in [*row["infer_seconds"].values(), *row["train_seconds"].values()])
        assert row["max_abs_difference"] < 1e-5
    assert (tmp_path / "out" / "llama_forward_paths.md").read_text().count("\n| ") == 5  # header + 4 rows
