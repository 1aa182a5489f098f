"""User states with the last decoder layer run only at the read position
(slmrec.last_state) equal the full forward's, for every backbone shape the project builds;
other architectures fall back to the full forward."""
from __future__ import annotations

import pytest
import torch

from slmrec.backbones import BackboneConfig
from slmrec.last_state import supports_last_only
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender
from tests.tiny_llm import save_tiny_llama

NUM_ITEMS, ITEM_DIM = 30, 8
# Rows of every length, so each row is read at a different position.
ITEMS = torch.tensor([[3, 7, 1, 0, 0, 0], [5, 2, 9, 4, 11, 30], [8, 0, 0, 0, 0, 0],
                      [1, 2, 3, 4, 5, 0]])


def table() -> torch.Tensor:
    t = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=torch.Generator().manual_seed(0))
    t[0] = 0
    return t


def full_forward_states(model: SeqRecommender) -> torch.Tensor:
    return model.last_position(model(ITEMS).hidden, ITEMS != 0)


def make(backbone: BackboneConfig) -> SeqRecommender:
    model = build_recommender(RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=8,
                                                backbone=backbone), table())
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.eval()


SCRATCH = dict(hidden=16, heads=4)


@pytest.mark.parametrize("backbone", [
    BackboneConfig(layers=3, **SCRATCH),
    BackboneConfig(layers=1, **SCRATCH),
    BackboneConfig(layers=2, kv_heads=2, **SCRATCH),  # grouped-query attention
    BackboneConfig(layers=2, lora="on", lora_r=2,
                   lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")),
], ids=["scratch-3", "scratch-1", "gqa", "lora-attention-and-mlp"])
def test_last_states_equal_the_full_forward(backbone):
    model = make(backbone)
    assert supports_last_only(model.decoder)
    with torch.no_grad():
        expected = full_forward_states(model)
        assert torch.allclose(model.user_states(ITEMS), expected, atol=1e-5)
        assert torch.allclose(model.user_vectors(ITEMS), model.project(expected), atol=1e-5)


def test_prompted_pretrained_backbone(tmp_path):
    source = save_tiny_llama(tmp_path / "llm")  # 2 heads sharing one key/value head
    model = make(BackboneConfig(name=str(source), layers=2))
    assert model.prompt_ids
    with torch.no_grad():
        assert torch.allclose(model.user_states(ITEMS), full_forward_states(model), atol=1e-5)


def test_bf16_autocast_stays_close():
    model = make(BackboneConfig(layers=2, **SCRATCH))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, full = model.user_states(ITEMS).float(), full_forward_states(model).float()
    assert torch.allclose(fast, full, atol=0.05)


@pytest.mark.parametrize("prompted", [False, True], ids=["scratch", "prompted"])
def test_gradients_flow_like_the_full_forward(prompted, tmp_path):
    backbone = (BackboneConfig(name=str(save_tiny_llama(tmp_path / "llm")), layers=2) if prompted
                else BackboneConfig(layers=2, **SCRATCH))
    model = make(backbone)
    assert bool(model.prompt_ids) == prompted
    grads = []
    for states in (lambda: model.user_states(ITEMS), lambda: full_forward_states(model)):
        model.zero_grad()
        states().square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters()
                                if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_other_architectures_use_the_full_forward():
    # Qwen3's attention normalises queries and keys, which the last-only path does not
    # reproduce: such a decoder must take the full forward.
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = SeqRecommender(RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=8),
                           Qwen3Model(config), table()).eval()
    assert not supports_last_only(model.decoder)
    with torch.no_grad():
        assert torch.equal(model.user_states(ITEMS), full_forward_states(model))


def test_empty_history_is_refused():
    model = make(BackboneConfig(layers=2, **SCRATCH))
    with pytest.raises(ValueError, match="no valid item"):
        model.user_states(torch.tensor([[3, 1], [0, 0]]))
