"""int8 dynamic quantisation: it really quantises, leaves the fp32 model alone, merges
LoRA exactly, and its answers stay close to fp32 on a test set (reported)."""
from __future__ import annotations

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from slmrec.backbones import merge_lora
from slmrec.quantize import count_quantized_linears, int8_parity, quantize_int8
from slmrec.recommend import pad_histories, user_vectors
from tests.tiny_serving import random_histories, tiny_model


def test_backbone_and_input_proj_are_quantised_fp32_model_untouched():
    model = tiny_model()
    quantized = quantize_int8(model)
    n_int8, n_float = count_quantized_linears(quantized)
    # 2 layers x (q, k, v, o, gate, up, down) + input_proj; `score` stays float.
    assert (n_int8, n_float) == (15, 1)
    assert count_quantized_linears(model) == (0, 16)
    assert torch.equal(quantized.item_table, model.item_table)
    # In place (what loading for int8 serving does): no second copy of the model.
    lora = tiny_model(lora="on")
    assert quantize_int8(lora, inplace=True) is lora
    assert count_quantized_linears(lora) == (15, 1)
    assert not any(isinstance(m, BaseTunerLayer) for m in lora.modules())


def test_merge_lora_keeps_outputs():
    model = tiny_model(lora="on")
    # Fresh LoRA B matrices are zero, which would make any merge look exact.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    items = pad_histories(random_histories(6, seed=3), model.config.max_len)
    before = user_vectors(model, items)
    assert merge_lora(model) == 6  # gate/up/down in each of 2 layers
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    torch.testing.assert_close(user_vectors(model, items), before, atol=1e-5, rtol=1e-5)


def test_int8_parity_on_a_test_set():
    model = tiny_model(seed=1)
    quantized = quantize_int8(model)
    sequences = random_histories(128, seed=5)
    histories, targets = [s[:-1] for s in sequences], [s[-1] for s in sequences]
    report = int8_parity(model, quantized, histories, targets, k=10)
    print("int8 parity (tiny random model, 128 users):", report)
    assert report["overlap@10"] >= 0.9
    assert abs(report["ndcg@10_delta"]) <= 0.02
    same = int8_parity(model, model, histories, targets, k=10)
    assert same["overlap@10"] == 1.0 and same["ndcg@10_delta"] == 0.0



def test_recommender_loads_an_int8_copy_from_a_checkpoint(tmp_path):
    from slmrec.recommend import Recommender

    model = tiny_model(seed=6)
    model.save(tmp_path / "m")
    loaded = Recommender.load(tmp_path / "m", int8=True)
    assert count_quantized_linears(loaded.model) == (15, 1)
    histories = random_histories(16, seed=2)
    _, fp32_top = Recommender(model)(histories, 5)
    _, int8_top = loaded(histories, 5)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5
                       for a, b in zip(fp32_top, int8_top)])
    assert overlap >= 0.8


def test_recommender_serves_a_lora_model_merged_with_the_same_answers(tmp_path):
    from slmrec.recommend import Recommender

    model = tiny_model(lora="on").eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save(tmp_path / "m")
    served = Recommender.load(tmp_path / "m")
    assert not any(isinstance(m, BaseTunerLayer) for m in served.model.modules()), "adapters merged for serving"
    histories = random_histories(16, seed=4)
    scores, top = served(histories, 5)
    want_scores, want_top = Recommender(model)(histories, 5)
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(top, want_top)
