"""Which protocols a final test reports, and that the masked one excludes exactly the
history the model reads."""
from __future__ import annotations

import torch

from slmrec.evaluation import EvalProtocol, ranks_from_vectors, reported_protocols


def test_every_final_test_reports_both_full_ranking_conventions_and_sampled():
    protocols = reported_protocols(num_negatives=99, seed=3)
    assert [p.label for p in protocols] == ["full", "full_masked", "sampled99"]
    assert "not masked" in protocols[0].description and "excluded" in protocols[1].description


def test_masked_full_ranking_drops_history_items_from_the_competition():
    # Items 1..4 with one-hot embeddings; the user scores item 1 > 2 > 3 > 4.
    table = torch.cat([torch.zeros(1, 4), torch.eye(4)])
    users = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    history = torch.tensor([[1, 2, 0]])  # right-padded
    target = torch.tensor([3])
    assert ranks_from_vectors(users, table, history, target, EvalProtocol("full")).tolist() == [2]
    masked = EvalProtocol("full", mask_history=True)
    assert ranks_from_vectors(users, table, history, target, masked).tolist() == [0]
