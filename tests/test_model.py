"""The recommender: shapes, frozen item table, LoRA placement, per-layer outputs, causality,
padding, save/load, prompt handling, teacher initialisation."""
from __future__ import annotations

import shutil

import pytest
import torch

from slmrec.backbones import BackboneConfig
from slmrec.model import (RecommenderConfig, SeqRecommender, build_recommender,
                          init_from_teacher)
from tests.tiny_llm import save_tiny_llama

NUM_ITEMS, ITEM_DIM = 30, 8


def item_table(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=g)
    table[0] = 0
    return table


def scratch(layers: int = 3, aux_heads: int = 0, **backbone) -> RecommenderConfig:
    return RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=8, aux_heads=aux_heads,
                             backbone=BackboneConfig(layers=layers, hidden=16, heads=2, **backbone))


ITEMS = torch.tensor([[3, 7, 1, 0, 0, 0], [5, 2, 9, 4, 11, 30]])


@pytest.fixture
def model() -> SeqRecommender:
    return build_recommender(scratch(), item_table()).eval()


def test_shapes_and_mask(model):
    out = model(ITEMS)
    assert out.hidden.shape == (2, 6, 16)
    assert out.layers is None
    assert torch.equal(out.mask, ITEMS != 0)
    logits = model.logits(out.hidden)
    assert logits.shape == (2, 6, NUM_ITEMS + 1)
    assert model.project(out.hidden).shape == (2, 6, ITEM_DIM)
    assert torch.allclose(logits[..., 1:], model.project(out.hidden) @ model.item_table[1:].T)
    # the training layout: the same scores without the padding column
    assert torch.allclose(model.item_logits(out.hidden), logits[..., 1:])


def test_padding_column_never_wins(model):
    h = torch.randn(4, 16)
    logits = model.logits(h)
    assert torch.isneginf(logits[:, 0]).all()
    assert torch.isfinite(logits[:, 1:]).all()
    # Every real item points away from the user, so each scores below the padding row's
    # zero: unmasked, padding would win.
    v = model.project(h[:1]).detach()
    model.item_table[1:] = -v + 0.01 * torch.randn(NUM_ITEMS, ITEM_DIM)
    logits = model.logits(h[:1])
    assert (logits[0, 1:] < 0).all()
    assert logits.argmax(-1).item() != 0


def test_aux_heads_score_against_the_item_table():
    model = build_recommender(RecommenderConfig(
        num_items=NUM_ITEMS, item_dim=ITEM_DIM, aux_heads=2,
        backbone=BackboneConfig(layers=2, hidden=16, heads=2)), item_table())
    h = torch.randn(3, 16)
    for i in range(2):
        logits = model.aux_item_logits(h, i)
        assert logits.shape == (3, NUM_ITEMS)  # items 1..N, the training losses' layout
        assert torch.allclose(logits, model.aux_heads[i](h) @ model.item_table[1:].T)
    assert not torch.allclose(model.aux_item_logits(h, 0), model.aux_item_logits(h, 1))


def test_output_layers_contract(model):
    """layers[d-1] = residual stream after decoder layer d; the last is post-norm (== hidden).
    The layers' outputs are captured from transformers' forward, which calls each layer
    (the LLaMA path of `forward` runs their parts itself)."""
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.decoder.layers]
    try:
        reference = model.hf_forward(ITEMS, output_layers=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == model.depth == 3
    out = model(ITEMS, output_layers=True)
    for layers in (reference.layers, out.layers):
        assert len(layers) == model.depth
        for d in range(2):
            assert torch.allclose(layers[d], captured[d], atol=1e-5)
        assert torch.allclose(layers[-1], model.decoder.norm(captured[-1]), atol=1e-5)
    assert torch.equal(out.layers[-1], out.hidden)
    assert not torch.allclose(captured[-1], out.hidden)  # the norm really was applied
    # Per-layer outputs do not change the final states.
    assert torch.equal(model(ITEMS).hidden, out.hidden)


def test_causal_output_at_t_ignores_later_items(model):
    a = torch.tensor([[4, 8, 15, 16, 23, 29]])
    b = a.clone()
    b[0, 3:] = torch.tensor([1, 2, 3])
    ha, hb = model(a).hidden, model(b).hidden
    assert torch.allclose(ha[:, :3], hb[:, :3], atol=1e-6)
    assert not torch.allclose(ha[:, 3:], hb[:, 3:])


def test_padding_does_not_change_valid_positions(model):
    short = model(torch.tensor([[3, 7, 1]])).hidden
    padded = model(torch.tensor([[3, 7, 1, 0, 0, 0]])).hidden
    assert torch.allclose(short, padded[:, :3], atol=1e-6)


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.tensor([[0, 3, 4]]))
    with pytest.raises(ValueError, match=r"0\.\.30"):
        model(torch.tensor([[3, 31]]))
    with pytest.raises(ValueError, match="max_len 8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.ones(1, 3))


def test_last_position():
    x = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.equal(SeqRecommender.last_position(x, mask), torch.stack([x[0, 1], x[1, 3]]))
    assert torch.equal(SeqRecommender.last_position(x[..., 0], mask), torch.tensor([3.0, 21.0]))
    with pytest.raises(ValueError, match="all padding"):
        SeqRecommender.last_position(x, torch.tensor([[True, False, False, False], [False] * 4]))


def test_item_table_is_frozen_through_an_optimiser_step():
    model = build_recommender(scratch(), item_table())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = model.item_table.clone()
    assert "item_table" not in dict(model.named_parameters())
    assert "item_table" in model.state_dict()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(ITEMS)
    logits = model.logits(out.hidden[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits[out.mask[:, 1:]], ITEMS[:, 1:][out.mask[:, 1:]])
    loss.backward()
    opt.step()
    assert torch.equal(model.item_table, table)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"input_proj.weight", "score.weight", "decoder.layers.0.mlp.up_proj.weight"} <= changed


def test_lora_leaves_only_adapters_and_projections_trainable():
    model = build_recommender(scratch(lora="on", lora_r=2), item_table())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"input_proj.weight", "input_proj.bias", "score.weight"} <= trainable
    backbone = {n for n in trainable if n.startswith("decoder.")}
    assert backbone and all("lora_" in n for n in backbone)
    assert {n.split(".")[4] for n in backbone} == {"gate_proj", "up_proj", "down_proj"}
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) + (NUM_ITEMS + 1) * ITEM_DIM
    assert counts["item_table"] == (NUM_ITEMS + 1) * ITEM_DIM
    assert counts["trainable"] < counts["total"]


def test_scratch_default_is_full_finetuning():
    model = build_recommender(scratch(), item_table())
    assert all(p.requires_grad for p in model.parameters())


def test_build_is_seeded():
    a = build_recommender(scratch(), item_table(), seed=1)
    b = build_recommender(scratch(), item_table(), seed=1)
    c = build_recommender(scratch(), item_table(), seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["score.weight"], sc["score.weight"])


def test_wrong_item_table_shape():
    with pytest.raises(ValueError, match=r"expected \(31, 8\)"):
        build_recommender(scratch(), torch.zeros(30, 8))


def _check_round_trip(model, directory):
    model.save(directory)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in directory.iterdir())
    loaded = SeqRecommender.load(directory).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        a, b = model.eval()(ITEMS, output_layers=True), loaded(ITEMS, output_layers=True)
    assert torch.equal(a.hidden, b.hidden)
    assert all(torch.equal(x, y) for x, y in zip(a.layers, b.layers))
    assert torch.equal(model.logits(a.hidden), loaded.logits(b.hidden))
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable(loaded) == trainable(model)
    return loaded


def test_save_load_round_trip_scratch(tmp_path):
    model = build_recommender(scratch(aux_heads=1), item_table())
    with torch.no_grad():  # so a load that silently reinitialised would be noticed
        model.score.weight.add_(1.0)
    _check_round_trip(model, tmp_path / "ckpt")


def test_save_load_round_trip_lora(tmp_path):
    model = build_recommender(scratch(lora="on", lora_r=2), item_table())
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    _check_round_trip(model, tmp_path / "ckpt")


def test_pretrained_with_prompt_saves_and_loads_without_the_source(tmp_path):
    source = save_tiny_llama(tmp_path / "llm")
    config = RecommenderConfig(num_items=NUM_ITEMS, item_dim=ITEM_DIM, max_len=8,
                               backbone=BackboneConfig(name=str(source), layers=2))
    model = build_recommender(config, item_table())
    assert len(model.prompt_ids) == 10 and model.full_depth == 4 and model.depth == 2
    no_prompt = build_recommender(RecommenderConfig(**{**config.to_dict(), "prompt": False}),
                                  item_table())
    assert no_prompt.prompt_ids == []
    out = model.eval()(ITEMS)
    assert out.hidden.shape == (2, 6, 16)
    # The prompt really is part of the input.
    assert not torch.allclose(out.hidden, no_prompt.eval()(ITEMS).hidden)
    shutil.rmtree(source)
    loaded = _check_round_trip(model, tmp_path / "ckpt")
    assert loaded.prompt_ids == model.prompt_ids


def test_prompted_model_is_causal_and_padding_blind(tmp_path):
    source = save_tiny_llama(tmp_path / "llm")
    model = build_recommender(RecommenderConfig(
        num_items=NUM_ITEMS, item_dim=ITEM_DIM, backbone=BackboneConfig(name=str(source))),
        item_table()).eval()
    short = model(torch.tensor([[3, 7, 1]])).hidden
    padded = model(torch.tensor([[3, 7, 1, 0, 0]])).hidden
    longer = model(torch.tensor([[3, 7, 1, 9, 2]])).hidden
    assert torch.allclose(short, padded[:, :3], atol=1e-6)
    assert torch.allclose(short, longer[:, :3], atol=1e-6)
    out = model(torch.tensor([[3, 7, 1, 0, 0]]), output_layers=True)
    assert [tuple(h.shape) for h in out.layers] == [(1, 5, 16)] * 4  # item positions only
    assert torch.equal(out.layers[-1], out.hidden)


def test_bfloat16_backbone():
    model = build_recommender(scratch(dtype="bfloat16"), item_table()).eval()
    out = model(ITEMS)
    assert out.hidden.dtype == torch.bfloat16
    logits = model.logits(out.hidden)
    assert logits.dtype == torch.float32 and torch.isfinite(logits[..., 1:]).all()


def test_bf16_weights_beside_an_fp32_item_table():
    # DeepSpeed's bf16 (GPU workers) casts the parameters and keeps buffers, the frozen
    # item table among them, in fp32: the projection once got fp32 rows and failed.
    model = build_recommender(scratch(aux_heads=1), item_table()).eval()
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    assert model.item_table.dtype == torch.float32
    out = model(ITEMS, output_layers=True)
    assert out.hidden.dtype == torch.bfloat16 and torch.isfinite(model.item_logits(out.hidden)).all()
    assert torch.isfinite(model.user_vectors(ITEMS)).all()


def test_load_rejects_other_checkpoints(tmp_path):
    from slmrec.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "x", {"w": torch.zeros(1)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a SeqRecommender checkpoint"):
        SeqRecommender.load(tmp_path / "x")


def test_init_from_teacher_copies_first_layers_and_projections():
    teacher = build_recommender(scratch(layers=3), item_table(), seed=0)
    student = build_recommender(scratch(layers=2), item_table(), seed=1)
    student_aux = build_recommender(scratch(layers=2, aux_heads=1), item_table(), seed=1)
    fresh_aux = student_aux.aux_heads[0].weight.clone()
    for s in (student, student_aux):
        init_from_teacher(s, teacher)
        t = teacher.state_dict()
        for name, value in s.state_dict().items():
            if not name.startswith("aux_heads."):
                assert torch.equal(value, t[name]), name
    assert torch.equal(student_aux.aux_heads[0].weight, fresh_aux)
    assert torch.equal(student.decoder.layers[1].mlp.up_proj.weight,
                       teacher.decoder.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="student has 3 layers, teacher only 2"):
        init_from_teacher(teacher, student)


def test_full_finetuning_student_starts_from_the_lora_teacher_merged():
    teacher = build_recommender(scratch(layers=3, lora="on", lora_r=2), item_table(), seed=0).eval()
    with torch.no_grad():  # LoRA's B starts at zero; give the adapters something to merge
        for name, p in teacher.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    student = build_recommender(scratch(layers=2, lora="off"), item_table(), seed=1).eval()
    init_from_teacher(student, teacher)
    assert all(p.requires_grad for p in student.decoder.parameters())
    assert not any("lora_" in n for n, _ in student.named_parameters())
    want, got = teacher(ITEMS, output_layers=True), student(ITEMS, output_layers=True)
    # the student's layers ARE the teacher's first two, adapters folded in
    torch.testing.assert_close(got.layers[0], want.layers[0], rtol=1e-4, atol=1e-4)
    unmerged = build_recommender(scratch(layers=3), item_table(), seed=0).eval()
    unmerged.load_state_dict({k.replace(".base_layer", ""): v for k, v in teacher.state_dict().items()
                              if ".lora_" not in k})
    assert not torch.allclose(unmerged(ITEMS, output_layers=True).layers[0], want.layers[0], atol=1e-3), \
        "the adapters matter, so the check above really saw them merged"
    full = build_recommender(scratch(layers=3, lora="off"), item_table(), seed=1).eval()
    init_from_teacher(full, teacher)
    torch.testing.assert_close(full(ITEMS).hidden, teacher(ITEMS).hidden, rtol=1e-4, atol=1e-4)


def test_init_from_teacher_refuses_a_different_prompt(tmp_path):
    source = save_tiny_llama(tmp_path / "llm")
    base = dict(num_items=NUM_ITEMS, item_dim=ITEM_DIM)
    teacher = build_recommender(RecommenderConfig(**base, backbone=BackboneConfig(name=str(source), layers=2)),
                                item_table())
    student = build_recommender(RecommenderConfig(**base, prompt=False,
                                                  backbone=BackboneConfig(name=str(source), layers=1)),
                                item_table())
    with pytest.raises(ValueError, match="different prompts"):
        init_from_teacher(student, teacher)
