"""bench/rescore_protocols.py on a tiny SASRec and a tiny recommender: both protocols per
model, the masked one equal to ranking with the history removed by hand."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.rescore_protocols import main
from slmrec.metrics import metrics_from_ranks, ranks_from_scores
from slmrec.model import build_recommender
from slmrec.sasrec import SASRec
from tests.test_model import NUM_ITEMS, item_table, scratch

SEQUENCES = [[3, 7, 1, 4, 9], [5, 2, 9, 4, 11, 30, 12], [8, 9, 1, 2, 3, 4, 5, 6, 7, 20]]


def test_rescore_reports_both_protocols_per_model(tmp_path):
    data = tmp_path / "data"
    (data / "sequences").mkdir(parents=True)
    pq.write_table(pa.table({"item_index": pa.array(SEQUENCES, pa.list_(pa.int32()))}),
                   data / "sequences" / "part-00000.parquet")
    torch.manual_seed(0)
    sasrec = SASRec(num_items=NUM_ITEMS, dim=8, max_len=4)
    sasrec.save(tmp_path / "sasrec")
    build_recommender(scratch(), item_table()).save(tmp_path / "llm")
    rows = main(["--model", str(tmp_path / "sasrec"), str(tmp_path / "llm"), "--data", str(data),
                 "--mask-len", "3", "--output", str(tmp_path / "out")])
    assert [r["max_len"] for r in rows] == [4, 8]
    # By hand for the SASRec: scores of its last 4 history items' state, the last 3 history
    # items removed from the competition.
    sasrec.eval()
    histories = [s[:-1] for s in SEQUENCES]
    with torch.no_grad():
        scores = []
        for h in histories:
            hidden = sasrec(torch.tensor([h[-4:]]))
            scores.append(sasrec.logits(hidden[0, -1]))
        scores = torch.stack(scores)
    targets = torch.tensor([s[-1] for s in SEQUENCES])
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    for row, h in enumerate(histories):
        exclude[row, [i for i in h[-3:] if i != targets[row]]] = True
    plain = metrics_from_ranks(ranks_from_scores(scores, targets))
    masked = metrics_from_ranks(ranks_from_scores(scores, targets, exclude))
    assert masked["MRR"] > plain["MRR"], "the case must have history items above a target"
    assert rows[0]["full/NDCG@10"] == pytest.approx(plain["NDCG@10"])
    assert rows[0]["full_masked/MRR"] == pytest.approx(masked["MRR"])
    for row in rows:
        assert row["full_masked/MRR"] >= row["full/MRR"]
    report = json.loads((tmp_path / "out" / "rescore_protocols.json").read_text())
    assert len(report["rows"]) == 2
    assert (tmp_path / "out" / "rescore_protocols.md").read_text().count("\n| `") == 2
