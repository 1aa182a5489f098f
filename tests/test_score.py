"""Offline scoring on Ray Data equals the in-process model's own top-k.

The expected answer is computed independently of slmrec.topk/recommend: the model's
full `logits` over all items, history items set to -inf, torch.topk.
"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from jobs.score import main as score_main
from tests.tiny_serving import item_id, random_histories, tiny_model, write_prepared

K = 30  # with histories of up to 12 of 40 items, some users have fewer than K left


def expected_top_k(model, history: list[int], k: int) -> tuple[list[int], list[float]]:
    items = torch.tensor([history[-model.config.max_len:]])
    with torch.no_grad():
        out = model(items)
        logits = model.logits(model.last_position(out.hidden, out.mask))[0]
    logits[history] = float("-inf")
    available = int(torch.isfinite(logits).sum())
    scores, indices = torch.topk(logits, min(k, available))
    return [item_id(i) for i in indices.tolist()], scores.tolist()


def test_offline_top_k_equals_in_process_model(ray_session, tmp_path):
    histories = random_histories(23, seed=11)
    prepared = write_prepared(tmp_path / "prepared", histories, files=3)
    model = tiny_model(seed=4)
    model.save(tmp_path / "model")
    summary = score_main(["--model", str(tmp_path / "model"), "--data", str(prepared),
                          "--output", str(tmp_path / "scores"), "--k", str(K),
                          "--batch-size", "5", "--chunk-size", "7", "--num-cpus", "2"])
    assert summary["users"] == len(histories)

    rows = pq.read_table(tmp_path / "scores").to_pylist()
    assert sorted(r["user_id"] for r in rows) == sorted(f"u{i}" for i in range(len(histories)))
    short = 0
    for row in rows:
        history = histories[int(row["user_id"][1:])]
        items, scores = expected_top_k(model, history, K)
        assert row["items"] == items, row["user_id"]
        assert row["scores"] == pytest.approx(scores, abs=1e-4)
        short += len(items) < K
    assert short > 0  # the case "fewer than k items left" was exercised


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "scores").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        score_main(["--model", str(tmp_path), "--data", str(tmp_path),
                    "--output", str(tmp_path / "scores")])
