"""Layer-redundancy probe: what each layer's state is, that the readouts train, the rows
it returns, bad input, and the plot."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slmrec.backbones import BackboneConfig
from slmrec.batching import to_arrays
from slmrec.model import RecommenderConfig, build_recommender, init_from_teacher
from slmrec.probe import last_positions, layer_states, plot_probe, probe_layers
from tests.tiny_llm import FULL_DEPTH, save_tiny_llama

NUM_ITEMS, ITEM_DIM, MAX_LEN = 20, 16, 10


def item_table() -> torch.Tensor:
    table = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=torch.Generator().manual_seed(0))
    table[0] = 0
    return table


def scratch(layers: int) -> RecommenderConfig:
    return RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=MAX_LEN,
                             backbone=BackboneConfig(layers=layers, hidden=32, heads=2))


def cyclic_sequences(count: int, seed: int = 0) -> list[list[int]]:
    """Runs of consecutive items wrapping from NUM_ITEMS to 1: the next item is a fixed
    function of the current one, so a readout that trains must rank it near the top."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start, length = int(rng.integers(1, NUM_ITEMS + 1)), int(rng.integers(5, 13))
        out.append([(start - 1 + t) % NUM_ITEMS + 1 for t in range(length)])
    return out


@pytest.fixture(scope="module")
def data() -> tuple[list[dict], list[dict]]:
    seqs = cyclic_sequences(64)
    train = [to_arrays(seqs[i:i + 16], "train", MAX_LEN) for i in range(0, 64, 16)]
    valid = [to_arrays(seqs[i:i + 32], "valid", MAX_LEN) for i in range(0, 64, 32)]
    return train, valid


@pytest.fixture(scope="module")
def model():
    return build_recommender(scratch(3), item_table(), seed=0)


ITEMS = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 4]])


def test_layer_state_is_what_a_model_truncated_there_would_emit(model):
    # Layer d's state = final norm of the residual stream after layer d, i.e. the output
    # of the same weights cut to d layers; the last layer's is the model's own output.
    model.eval()
    states, mask = layer_states(model, ITEMS)
    assert len(states) == 3 and torch.equal(mask, ITEMS != 0)
    assert torch.allclose(states[-1], model(ITEMS).hidden)
    shallow = build_recommender(scratch(2), item_table(), seed=1).eval()
    init_from_teacher(shallow, model)
    assert torch.allclose(states[1], shallow(ITEMS).hidden, atol=1e-5)
    assert not torch.allclose(states[0], states[1])


def test_layer_zero_is_the_normed_item_projection(model):
    model.eval()
    states, _ = layer_states(model, ITEMS, include_input=True)
    assert len(states) == 4
    expected = model.decoder.norm(model.input_proj(model.item_table[ITEMS]))
    assert torch.allclose(states[0], expected)


def test_rows_one_per_layer_with_metrics_in_range(model, data):
    train, valid = data
    rows = probe_layers(model, train, valid, steps=3, lr=1e-2, seed=0)
    assert [r["layer"] for r in rows] == [1, 2, 3]
    assert [r["source_layer"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["protocol"] == "full"
        for name in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR"):
            assert 0.0 <= r[name] <= 1.0
        assert r["train_ce"] > 0
    with_input = probe_layers(model, train, valid, steps=1, lr=0.0, seed=0, include_input=True)
    assert [r["layer"] for r in with_input] == [0, 1, 2, 3]


def test_readouts_train_and_beat_an_untrained_readout(model, data):
    train, valid = data
    model.train()
    untrained = probe_layers(model, train, valid, steps=1, lr=0.0, seed=0)
    trained = probe_layers(model, train, valid, steps=60, lr=1e-2, seed=0)
    for before, after in zip(untrained, trained):
        assert after["NDCG@10"] > before["NDCG@10"] + 0.4
        assert after["train_ce"] < 0.5 * before["train_ce"]
    # The backbone stays frozen and the model keeps its mode.
    assert model.training is True


def test_autocast_probe_reads_nearly_the_same_states(model, data):
    """bf16 forwards shift the frozen states slightly; the fp32 readouts still fit them and
    rank about as well (a bf16 ranking would also tie far more scores)."""
    train, valid = data
    exact = probe_layers(model, train, valid, steps=60, lr=1e-2, seed=0)
    fast = probe_layers(model, train, valid, steps=60, lr=1e-2, seed=0, autocast=True)
    assert [r["layer"] for r in fast] == [r["layer"] for r in exact]
    for a, b in zip(exact, fast):
        assert b["NDCG@10"] == pytest.approx(a["NDCG@10"], abs=0.05)
        assert b["train_ce"] == pytest.approx(a["train_ce"], rel=0.1)
        assert b["train_ce"] != a["train_ce"], "the autocast path must really run in bf16"


def test_probe_leaves_model_weights_alone(data):
    model = build_recommender(scratch(2), item_table(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe_layers(model, *data, steps=5, lr=1e-1, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_source_layers_follow_interval_truncation(tmp_path, data):
    config = RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=MAX_LEN, prompt=False,
                               backbone=BackboneConfig(name=str(save_tiny_llama(tmp_path / "llm")),
                                                       layers=2, truncation="interval"))
    model = build_recommender(config, item_table())
    rows = probe_layers(model, *data, steps=1, lr=1e-2, seed=0)
    assert [(r["layer"], r["source_layer"]) for r in rows] == [(1, 1), (2, FULL_DEPTH)]


def test_bad_batches_are_refused(model, data):
    train, valid = data
    with pytest.raises(ValueError, match="train targets must have shape"):
        probe_layers(model, valid, valid, steps=1)
    with pytest.raises(ValueError, match="valid targets must have shape"):
        probe_layers(model, train, train, steps=1)
    with pytest.raises(ValueError, match="held no batch"):
        probe_layers(model, [], valid, steps=1)
    with pytest.raises(ValueError, match="no users"):
        probe_layers(model, train, [], steps=1)


def test_plot_writes_a_png_for_several_models(tmp_path):
    rows = lambda depth: [{"layer": d, "NDCG@10": 0.1 * d, "protocol": "full"} for d in range(1, depth + 1)]
    path = plot_probe({"teacher (8 layers)": rows(8), "full backbone (30 layers)": rows(30)},
                      tmp_path / "plots" / "probe.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="lack 'HR@10'"):
        plot_probe({"teacher": rows(2)}, tmp_path / "x.png", metric="HR@10")


def test_last_positions_keeps_the_latest_targets_of_each_row():
    targets = torch.tensor([[5, 6, 7, 8, 0, 0],
                            [9, 0, 0, 0, 0, 0],
                            [1, 2, 3, 4, 5, 6]])
    assert last_positions(targets, 2).tolist() == [[False, False, True, True, False, False],
                                                   [True, False, False, False, False, False],
                                                   [False, False, False, False, True, True]]


def test_full_backbone_is_every_layer_frozen_without_adapters(tmp_path, data):
    from jobs.common.distill_report import full_backbone_of

    config = RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=MAX_LEN, prompt=False,
                               backbone=BackboneConfig(name=str(save_tiny_llama(tmp_path / "llm")), layers=2,
                                                       lora="on"))
    teacher = build_recommender(config, item_table(), seed=3)
    whole = full_backbone_of(teacher)
    assert whole.depth == whole.full_depth == FULL_DEPTH and not whole.training
    assert not any("lora" in name for name, _ in whole.named_parameters())
    assert torch.equal(whole.input_proj.weight, teacher.input_proj.weight)
    assert torch.equal(whole.item_table, teacher.item_table)
    rows = probe_layers(whole, *data, steps=2, lr=1e-2, seed=0)
    assert [r["source_layer"] for r in rows] == list(range(1, FULL_DEPTH + 1))
    assert full_backbone_of(whole) is None  # nothing deeper to probe


def test_probe_caption_warns_when_validation_targets_were_trained_on():
    from jobs.common.distill_report import probe_caption
    from jobs.distill import DistillConfig

    held_out = DistillConfig(data="d", output="o", probe_users=256)
    assert probe_caption(held_out) == "256 users; frozen forwards in fp32, readouts fp32."
    trained_on = DistillConfig(data="d", output="o", probe_users=256, train_on_valid=True, bf16_autocast=True)
    assert probe_caption(trained_on).startswith("256 users; frozen forwards in bf16 autocast")
    assert "trained on these validation targets (--train-on-valid)" in probe_caption(trained_on)
