"""The LLaMA path (slmrec.llama_forward: the prompt run once per batch, the last layer only
where ranking reads it) equals transformers' own forward, values and gradients, for every
backbone shape the project builds; other architectures take transformers' forward."""
from __future__ import annotations

import pytest
import torch

from slmrec.backbones import BackboneConfig
from slmrec.llama_forward import supported
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender
from tests.tiny_llm import save_tiny_llama

NUM_ITEMS, ITEM_DIM = 30, 8
# Rows of every length, so each row is read at a different position.
ITEMS = torch.tensor([[3, 7, 1, 0, 0, 0], [5, 2, 9, 4, 11, 30], [8, 0, 0, 0, 0, 0],
                      [1, 2, 3, 4, 5, 0]])
MASK = ITEMS != 0


def table() -> torch.Tensor:
    t = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=torch.Generator().manual_seed(0))
    t[0] = 0
    return t


def make(backbone: BackboneConfig) -> SeqRecommender:
    model = build_recommender(RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=8,
                                                backbone=backbone), table())
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.eval()


SCRATCH = dict(hidden=16, heads=4)
BACKBONES = {
    "scratch-3": lambda tmp: BackboneConfig(layers=3, **SCRATCH),
    "scratch-1": lambda tmp: BackboneConfig(layers=1, **SCRATCH),
    "gqa": lambda tmp: BackboneConfig(layers=2, kv_heads=2, **SCRATCH),
    "lora-attention-and-mlp": lambda tmp: BackboneConfig(
        layers=2, lora="on", lora_r=2, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")),
    # a pretrained checkpoint with a tokenizer, so a prompt; 2 heads sharing one key/value head
    "prompted": lambda tmp: BackboneConfig(name=str(save_tiny_llama(tmp / "llm")), layers=3),
    "prompted-1": lambda tmp: BackboneConfig(name=str(save_tiny_llama(tmp / "llm")), layers=1),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_path_equals_transformers_forward(name, tmp_path):
    model = make(BACKBONES[name](tmp_path))
    assert supported(model.decoder)
    assert bool(model.prompt_ids) == name.startswith("prompted")
    with torch.no_grad():
        reference = model.hf_forward(ITEMS, output_layers=True)
        out = model(ITEMS, output_layers=True)
        assert torch.allclose(out.hidden[MASK], reference.hidden[MASK], atol=1e-5)
        assert len(out.layers) == len(reference.layers) == model.depth
        for layer, expected in zip(out.layers, reference.layers):
            assert torch.allclose(layer[MASK], expected[MASK], atol=1e-5)
        last = model.last_position(reference.hidden, MASK)
        assert torch.allclose(model.user_states(ITEMS), last, atol=1e-5)
        assert torch.allclose(model.user_vectors(ITEMS), model.project(last), atol=1e-5)


def test_bf16_autocast_stays_close(tmp_path):
    model = make(BACKBONES["prompted"](tmp_path))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model.user_states(ITEMS).float()
        full = model.last_position(model.hf_forward(ITEMS).hidden, MASK).float()
    assert torch.allclose(fast, full, atol=0.05)


@pytest.mark.parametrize("name", ["scratch-3", "prompted"])
def test_gradients_equal_transformers_forward(name, tmp_path):
    """Training reads every position (forward) and ranking one (user_states); both must
    train the weights as transformers' forward would, the prompt's shared states included."""
    model = make(BACKBONES[name](tmp_path))
    for p in model.decoder.get_input_embeddings().parameters():
        p.requires_grad_(True)  # the prompt's token embeddings get their gradient through the batch
    # A fixed random read-out of the states (a sum of squares of post-norm states has
    # near-zero gradients: the norm removes the radial direction).
    readout = torch.randn(model.decoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for states in (lambda: model.user_states(ITEMS), lambda: model(ITEMS).hidden[MASK],
                   lambda: model.last_position(model.hf_forward(ITEMS).hidden, MASK),
                   lambda: model.hf_forward(ITEMS).hidden[MASK]):
        model.zero_grad()
        (states() @ readout).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters() if p.grad is not None]))
    for fast, reference in ((grads[0], grads[2]), (grads[1], grads[3])):
        assert reference.abs().max() > 1e-2
        assert (fast - reference).abs().max() <= 1e-4 * reference.abs().max()

def test_other_architectures_use_transformers_forward():
    # Qwen3's attention normalises queries and keys, which the LLaMA path does not
    # reproduce: such a decoder must take transformers' forward.
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = SeqRecommender(RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=8),
                           Qwen3Model(config), table()).eval()
    assert not supported(model.decoder)
    with torch.no_grad():
        reference = model.hf_forward(ITEMS, output_layers=True)
        out = model(ITEMS, output_layers=True)
        assert torch.equal(out.hidden, reference.hidden)
        assert all(torch.equal(a, b) for a, b in zip(out.layers, reference.layers))
        assert torch.equal(model.user_states(ITEMS), model.last_position(reference.hidden, MASK))


def test_empty_history_is_refused():
    model = make(BackboneConfig(layers=2, **SCRATCH))
    with pytest.raises(ValueError, match="no valid item"):
        model.user_states(torch.tensor([[3, 1], [0, 0]]))
