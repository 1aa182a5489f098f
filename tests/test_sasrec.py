"""SASRec (stage 0): shapes, padding and causality, the exported item table, save/load,
and that it learns a trivial next-item rule."""
from __future__ import annotations

import pytest
import torch

from slmrec.sasrec import SASRec

N = 20


def make(seed: int = 0, **kw) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(num_items=N, **{"dim": 16, "blocks": 2, "heads": 1, "dropout": 0.0,
                                  "max_len": 10, **kw})


def test_shapes_padding_zero_and_logits():
    model = make().eval()
    items = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    h = model(items)
    assert h.shape == (2, 5, 16)
    assert torch.equal(h[0, 3:], torch.zeros(2, 16))
    logits = model.logits(h)
    assert logits.shape == (2, 5, N + 1)
    assert torch.isneginf(logits[..., 0]).all() and (logits.argmax(-1) != 0).all()
    assert torch.allclose(logits[..., 1:], h @ model.item_emb.weight[1:].T)


def test_item_table():
    model = make()
    table = model.item_table()
    assert table.shape == (N + 1, 16)
    assert torch.equal(table[0], torch.zeros(16))
    assert torch.equal(table[1:], model.item_emb.weight[1:])
    assert not table.requires_grad


def test_causal_and_padding_blind():
    model = make().eval()
    a = model(torch.tensor([[3, 9, 4, 11, 12]]))
    b = model(torch.tensor([[3, 9, 4, 1, 2]]))
    short = model(torch.tensor([[3, 9, 4]]))
    padded = model(torch.tensor([[3, 9, 4, 0, 0, 0]]))
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    assert torch.allclose(short, padded[:, :3], atol=1e-6)


def test_bad_inputs():
    model = make()
    with pytest.raises(ValueError, match="max_len 10"):
        model(torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.20"):
        model(torch.tensor([[21]]))
    with pytest.raises(ValueError, match="divisible"):
        SASRec(num_items=N, dim=10, heads=3)


def test_save_load_round_trip(tmp_path):
    model = make(dropout=0.5)
    model.save(tmp_path / "s")
    loaded = SASRec.load(tmp_path / "s").eval()
    items = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    assert torch.equal(model.eval()(items), loaded(items))
    assert loaded.hparams == model.hparams
    assert torch.equal(loaded.item_table(), model.item_table())


def test_learns_a_successor_rule():
    """Next item = current + 1: full-softmax CE on all positions must nearly solve it."""
    model = make()
    starts = torch.arange(1, 11)
    seqs = starts[:, None] + torch.arange(8)[None, :]  # items 1..17
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model.logits(model(inputs)).flatten(0, 1),
                                                 targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model.eval().logits(model(inputs)).argmax(-1) == targets).float().mean()
    assert accuracy > 0.9
