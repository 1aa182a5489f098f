"""Inference and training speed of a recommender at fixed batch sizes.

The paper's speed claims (up to 8x faster inference, 6.6x faster training for the
student) are ratios between models, so what matters is that every model is timed on
the same inputs, the same way:
- inputs are drawn from a dedicated generator seeded from (seed, batch size), so every
  model sees identical full-length histories whatever the global RNG state;
- inference is what serving does (slmrec.recommend): user vectors from the histories,
  then a full-ranking top-k over the whole item table with the histories excluded,
  under `torch.inference_mode`;
- a training step is forward + backward + gradient clipping (1.0, as the training loop)
  + AdamW step, on a task (slmrec.tasks), so a distillation step can be timed with its
  teacher forward included. The model's weights and mode are restored afterwards.
Warm-up iterations are not timed; on CUDA every timed iteration ends with a synchronise.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from slmrec.evaluation import Ranker
from slmrec.model import SeqRecommender
from slmrec.recommend import user_vectors
from slmrec.sasrec import SASRec
from slmrec.tasks import NextItemTask, SASRecTask, Task
from slmrec.topk import chunked_topk

TOP_K = 10


def synthetic_batch(num_items: int, batch_size: int, seq_len: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(items [B, L], next-item targets [B, L]): full-length random histories of items
    1..num_items, identical for every call with the same arguments (CPU tensors)."""
    if num_items < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"num_items, batch_size and seq_len must be >= 1, got "
                         f"{num_items}, {batch_size}, {seq_len}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_size)
    sequence = torch.randint(1, num_items + 1, (batch_size, seq_len + 1), generator=gen)
    return sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` timed calls of `fn`, after `warmup` untimed ones."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _percentile_ms(times: Sequence[float], q: int) -> float:
    if len(times) == 1:
        return times[0] * 1e3
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] * 1e3


def _num_items(table: torch.Tensor, num_items: int | None) -> int:
    available = table.shape[0] - 1
    if num_items is None:
        return available
    if not 1 <= num_items <= available:
        raise ValueError(f"num_items must be in 1..{available} (the model's item table), got {num_items}")
    return num_items


def _ranker(model: SeqRecommender | Ranker, device: torch.device
            ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(module, items -> user vectors, item table) for any ranker, moved to `device`
    first (moving replaces the table tensor, so it is read afterwards)."""
    if isinstance(model, SeqRecommender):
        model.to(device)
        return model, lambda items: user_vectors(model, items), model.item_table
    if isinstance(model, SASRec):
        model = SASRecTask(model)
    if not (hasattr(model, "user_vectors") and hasattr(model, "item_table")):
        raise TypeError(f"cannot measure inference of {type(model).__name__}: expected a SeqRecommender, "
                        "a SASRec or a Ranker (user_vectors + item_table)")
    module = getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(model).__name__} has no `model` module to run in eval mode")
    module.to(device)
    return module, lambda items: model.user_vectors(items).float(), model.item_table()


def measure_inference(model: SeqRecommender | Ranker, num_items: int | None = None, seq_len: int = 50,
                      batch_sizes: Sequence[int] = (1, 32, 256), warmup: int = 2, repeats: int = 10,
                      device: str | torch.device = "cpu", seed: int = 0, k: int = TOP_K) -> list[dict[str, Any]]:
    """Serving speed per batch size: [{batch_size, samples_per_s, latency_ms_p50,
    latency_ms_p99}], one row per batch size. One sample = one user's top-k from a
    `seq_len`-item history. samples_per_s = batch_size * repeats / total timed seconds.
    Moves the model to `device`; its train/eval mode is restored afterwards."""
    device = torch.device(device)
    module, vectors_of, table = _ranker(model, device)
    table = table.float()
    num_items = _num_items(table, num_items)
    was_training = module.training
    module.eval()
    rows = []
    try:
        for batch_size in batch_sizes:
            items, _ = synthetic_batch(num_items, batch_size, seq_len, seed)
            items = items.to(device)

            @torch.inference_mode()
            def serve() -> None:
                chunked_topk(vectors_of(items), table, min(k, num_items), items, exclude_seen=True)

            times = _time(serve, warmup, repeats, device)
            rows.append({"batch_size": batch_size, "samples_per_s": batch_size * repeats / sum(times),
                         "latency_ms_p50": _percentile_ms(times, 50),
                         "latency_ms_p99": _percentile_ms(times, 99)})
    finally:
        module.train(was_training)
    return rows


def _task(model_or_task: SeqRecommender | SASRec | Task) -> Task:
    if isinstance(model_or_task, SeqRecommender):
        return NextItemTask(model_or_task)
    if isinstance(model_or_task, SASRec):
        return SASRecTask(model_or_task)
    if not (hasattr(model_or_task, "loss") and isinstance(getattr(model_or_task, "model", None), nn.Module)):
        raise TypeError(f"cannot measure training of {type(model_or_task).__name__}: expected a "
                        "SeqRecommender, a SASRec or a task with `model` and `loss`")
    return model_or_task


def measure_training(model_or_task: SeqRecommender | SASRec | Task, num_items: int | None = None,
                     seq_len: int = 50, batch_size: int = 32, warmup: int = 1, repeats: int = 5,
                     device: str | torch.device = "cpu", seed: int = 0, lr: float = 1e-4,
                     bf16_autocast: bool = False) -> dict[str, Any]:
    """Training speed at one batch: {batch_size, seq_len, samples_per_s, tokens_per_s,
    step_ms_p50, step_ms_p99}. A sample is one user sequence trained at all `seq_len`
    positions in one causal pass; `bf16_autocast` runs the forward as the training jobs'
    --bf16-autocast does. The trained module's weights and mode are restored afterwards
    (the optimiser state is discarded)."""
    device = torch.device(device)
    task = _task(model_or_task)
    module = task.model
    module.to(device)
    if getattr(task, "teacher", None) is not None:
        task.teacher.to(device)
    num_items = _num_items(task.item_table(), num_items)
    items, targets = synthetic_batch(num_items, batch_size, seq_len, seed)
    batch = {"items": items.to(device), "targets": targets.to(device)}
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameter; nothing to time")
    saved = {name: value.detach().clone() for name, value in module.state_dict().items()}
    was_training = module.training
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = task.loss(batch).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    module.train()
    try:
        times = _time(step, warmup, repeats, device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        module.load_state_dict(saved)
        module.train(was_training)
    per_s = batch_size * repeats / sum(times)
    return {"batch_size": batch_size, "seq_len": seq_len, "samples_per_s": per_s,
            "tokens_per_s": per_s * seq_len, "step_ms_p50": _percentile_ms(times, 50),
            "step_ms_p99": _percentile_ms(times, 99)}
