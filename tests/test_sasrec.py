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
    assert torch.allclose(model.item_logits(h), logits[..., 1:])  # the training layout


def test_item_table():
    model = make()
    table = model.item_table()
    assert table.shape == (N + 1, 16)
    assert torch.equal(table[0], torch.zeros(16))
    assert torch.equal(table[1:], model.item_emb.weight[1:])
    assert not table.requires_grad


def test_cosine_logits_and_table_by_hand():
    model = SASRec(num_items=2, dim=2, heads=1, max_len=3, cosine_temperature=0.5)
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0]]))
    h = torch.tensor([[3.0, 4.0]])  # unit: (0.6, 0.8)
    # cos with (1, 0) = 0.6, with (1, 1)/sqrt(2) = 1.4/sqrt(2); both / 0.5
    expected = torch.tensor([[float("-inf"), 1.2, 2.8 / 2 ** 0.5]])
    assert torch.allclose(model.logits(h), expected)
    assert torch.allclose(model.item_logits(h), expected[:, 1:])
    table = model.item_table()
    assert torch.allclose(table, torch.tensor([[0.0, 0.0], [1.0, 0.0], [2 ** -0.5, 2 ** -0.5]]))
    # Ranking the raw state against the exported table orders items as the logits do.
    users = torch.randn(6, 2)
    assert torch.equal((users @ table[1:].T).argsort(-1), model.logits(users)[:, 1:].argsort(-1))
    with pytest.raises(ValueError, match="cosine_temperature"):
        SASRec(num_items=2, dim=2, cosine_temperature=-1.0)


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


@pytest.mark.parametrize("cosine_temperature", [0.0, 0.1])
def test_learns_a_successor_rule(cosine_temperature):
    """Next item = current + 1: full-softmax CE on all positions must nearly solve it."""
    model = make(cosine_temperature=cosine_temperature)
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
