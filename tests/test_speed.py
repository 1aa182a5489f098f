"""Speed measurement: the rows it returns, identical inputs across models, and that
timing a training step leaves the model as it was. No timed assertions (see bench/)."""
from __future__ import annotations

import pytest
import torch

from slmrec.backbones import BackboneConfig
from slmrec.model import RecommenderConfig, build_recommender
from slmrec.sasrec import SASRec
from slmrec.speed import measure_inference, measure_training, synthetic_batch
from slmrec.tasks import DistillTask

NUM_ITEMS, ITEM_DIM = 30, 8


def recommender(layers: int, aux_heads: int = 0):
    table = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=torch.Generator().manual_seed(0))
    config = RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=12, aux_heads=aux_heads,
                               backbone=BackboneConfig(layers=layers, hidden=16, heads=2))
    return build_recommender(config, table)


def test_synthetic_batch_is_the_same_for_every_caller():
    torch.manual_seed(1)
    items, targets = synthetic_batch(NUM_ITEMS, 4, 6, seed=3)
    torch.manual_seed(2)
    again, _ = synthetic_batch(NUM_ITEMS, 4, 6, seed=3)
    assert torch.equal(items, again)
    assert items.shape == targets.shape == (4, 6)
    assert int(items.min()) >= 1 and int(items.max()) <= NUM_ITEMS
    # Targets are the next item of the same sequence.
    assert torch.equal(items[:, 1:], targets[:, :-1])
    with pytest.raises(ValueError, match="must be >= 1"):
        synthetic_batch(NUM_ITEMS, 0, 6)


def test_inference_rows_per_batch_size():
    model = recommender(2)
    rows = measure_inference(model, seq_len=8, batch_sizes=(1, 4, 16), warmup=1, repeats=3)
    assert [r["batch_size"] for r in rows] == [1, 4, 16]
    for r in rows:
        assert r["samples_per_s"] > 0
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
    assert model.training is True


def test_inference_accepts_sasrec_and_checks_num_items():
    rows = measure_inference(SASRec(NUM_ITEMS, dim=8, max_len=12), seq_len=8, batch_sizes=(2,),
                             warmup=0, repeats=1)
    assert rows[0]["samples_per_s"] > 0 and rows[0]["latency_ms_p50"] == rows[0]["latency_ms_p99"]
    with pytest.raises(ValueError, match="num_items must be in 1..30"):
        measure_inference(recommender(1), num_items=31, seq_len=4, batch_sizes=(1,), repeats=1)
    with pytest.raises(TypeError, match="cannot measure inference"):
        measure_inference(torch.nn.Linear(2, 2), seq_len=4, batch_sizes=(1,), repeats=1)


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_training_step_rate_and_model_restored(bf16_autocast):
    model = recommender(2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_training(model, seq_len=8, batch_size=4, warmup=1, repeats=2, lr=1e-1,
                              bf16_autocast=bf16_autocast)
    assert result["batch_size"] == 4 and result["seq_len"] == 8
    assert result["samples_per_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(8 * result["samples_per_s"])
    assert 0 < result["step_ms_p50"] <= result["step_ms_p99"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training is False


def test_training_times_a_distillation_task():
    task = DistillTask(recommender(2, aux_heads=1), teacher=recommender(4), num_blocks=2)
    result = measure_training(task, seq_len=8, batch_size=2, warmup=0, repeats=1)
    assert result["samples_per_s"] > 0
    frozen = recommender(1)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        measure_training(frozen, seq_len=4, batch_size=1, repeats=1)


def test_throughput_bench_reports_autocast_side_by_side(tmp_path):
    import json

    from bench.train_throughput import main

    main(["--layers", "2", "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1", "--intermediate", "32",
          "--num-items", "20", "--item-dim", "8", "--seq-len", "4", "--batch-size", "2", "--rounds", "1",
          "--repeats", "1", "--warmup", "0", "--bf16-autocast", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert [r["layers"] for r in rows] == [2, 1]
    for r in rows:
        assert r["autocast_speedup"] == pytest.approx(r["train_autocast_samples_per_s"] / r["train_samples_per_s"])
    assert "bf16 autocast" in (tmp_path / "throughput.md").read_text()
