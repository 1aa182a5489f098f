"""An int8 copy of a trained recommender for CPU serving, and how far it drifts.

Dynamic quantisation (torch.ao.quantization.quantize_dynamic) stores nn.Linear weights
as int8 and quantises activations on the fly, per batch: no calibration data, no
retraining. It covers the backbone's attention and MLP projections and `input_proj`,
where nearly all the compute is. `score` and the auxiliary heads stay float32: the model
reads their `.weight.dtype`, which a quantised Linear no longer has as a tensor, and
`score` is one small hidden x item_dim matrix. The frozen item table stays float32 too
(it is a buffer), so ranking is an fp32 dot product against exactly the trained table.

LoRA adapters are merged into their base weights first: a merged Linear quantises as one
matrix, while peft's wrapper reads `.weight` of the adapter Linears, which a quantised
module no longer exposes as a tensor.

Checked on torch 2.13 with Hugging Face Llama decoder layers: quantize_dynamic still
works there but warns that torch.ao.quantization is deprecated in favour of torchao
(not installed here); `quantize_int8` silences exactly those warnings.
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import nn

from slmrec.backbones import merge_lora
from slmrec.metrics import full_ranking_ranks, metrics_from_ranks
from slmrec.model import SeqRecommender
from slmrec.recommend import pad_histories, user_vectors
from slmrec.topk import NO_ITEM, chunked_topk


FLOAT_MODULES = ("score", "aux_heads")
"""Linear layers kept in float32 (see the module docstring)."""


def quantize_int8(model: SeqRecommender, inplace: bool = False) -> SeqRecommender:
    """An int8 (dynamic) copy of `model` in eval mode; `model` itself is left untouched
    unless `inplace` (a model loaded only to be quantised need not exist twice in memory)."""
    quantized = (model if inplace else copy.deepcopy(model)).eval()
    merge_lora(quantized)
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    spec = {name: qconfig for name, m in quantized.named_modules()
            if type(m) is nn.Linear and not name.startswith(FLOAT_MODULES)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        torch.ao.quantization.quantize_dynamic(quantized, spec, dtype=torch.qint8, inplace=True)
    return quantized


def count_quantized_linears(model: nn.Module) -> tuple[int, int]:
    """(quantised Linear modules, float nn.Linear modules left)."""
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    return (sum(isinstance(m, dynamic) for m in model.modules()),
            sum(type(m) is nn.Linear for m in model.modules()))


def int8_parity(reference: SeqRecommender, quantized: SeqRecommender,
                histories: Sequence[Sequence[int]], targets: Sequence[int], k: int = 10,
                exclude_seen: bool = False, batch_size: int = 256) -> dict[str, float]:
    """How much the int8 model's answers differ from the fp32 model's on a test set.

    overlap@k: mean |topk_fp32 & topk_int8| / k over users; NDCG@k of each model on the
    held-out `targets` (full ranking; history masked iff exclude_seen) and their delta
    (int8 - fp32). Histories must be non-empty.
    """
    if len(histories) != len(targets) or not histories:
        raise ValueError(f"need one target per history and at least one user, got "
                         f"{len(histories)} histories and {len(targets)} targets")
    overlap = 0.0
    ranks: dict[str, list[torch.Tensor]] = {"fp32": [], "int8": []}
    for start in range(0, len(histories), batch_size):
        chunk = histories[start:start + batch_size]
        target = torch.as_tensor(targets[start:start + batch_size], dtype=torch.long)
        items = pad_histories(chunk, reference.config.max_len)
        seen = pad_histories(chunk) if exclude_seen else None
        tops = []
        for name, model in (("fp32", reference), ("int8", quantized)):
            users = user_vectors(model, items)
            tops.append(chunked_topk(users, model.item_table, k, seen, exclude_seen)[1])
            ranks[name].append(full_ranking_ranks(users, model.item_table, target,
                                                  history_items=seen))
        for a, b in zip(*tops):
            overlap += len(set(a.tolist()) & set(b.tolist()) - {NO_ITEM}) / k
    # NDCG@1 is HR@1, which metrics_from_ranks reports under that name only.
    key = f"NDCG@{k}" if k > 1 else "HR@1"
    ndcg = {name: metrics_from_ranks(torch.cat(r), ks=(k,))[key] for name, r in ranks.items()}
    return {
        "users": float(len(histories)),
        f"overlap@{k}": overlap / len(histories),
        f"ndcg@{k}_fp32": ndcg["fp32"],
        f"ndcg@{k}_int8": ndcg["int8"],
        f"ndcg@{k}_delta": ndcg["int8"] - ndcg["fp32"],
    }
