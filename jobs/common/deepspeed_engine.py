"""DeepSpeed inside Ray Train workers: config resolution and engine set-up.

The ZeRO stage and everything else DeepSpeed-specific live in a JSON file under
cluster/deepspeed/ (chosen with --deepspeed-config); this module only fills the values
that depend on the run (batch sizes, world size, bf16 on GPUs) and starts the engine
on the process group Ray Train already created.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DS_CONFIG = ROOT / "cluster" / "deepspeed" / "zero0.json"


def load_ds_config(path: str | Path | None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_DS_CONFIG
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"DeepSpeed config {path}: cannot read ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path}: invalid JSON ({e})") from e


def resolve_ds_config(base: dict[str, Any], micro_batch: int, grad_accum: int, world_size: int) -> dict[str, Any]:
    """Fill the run-dependent fields; explicit values in the file win over ours except
    batch sizes, which must agree with the data loader. bf16 "auto" is left to the
    workers (`resolve_precision`)."""
    cfg = json.loads(json.dumps(base))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    # CPU workers use torch's AdamW (our client optimizer): DeepSpeed's fused/CPU Adam
    # need a 1.5-4 min compile per worker.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def resolve_precision(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The config with bf16 "auto" (or no bf16 entry) resolved for the device a worker
    trains on: on for a CUDA GPU that has bf16, else off. Decided in the worker, because
    the driver may run where there is no GPU (a CPU head node, as in cluster/aws.yaml)."""
    cfg = json.loads(json.dumps(cfg))
    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def prepare_cpu_backend() -> None:
    """On CPU, DeepSpeed compiles a shared-memory allreduce op inside init_distributed
    (1-2 min per worker); gloo works without it. The module object must be patched via
    importlib: `import deepspeed.comm.torch as m` resolves to the torch package."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None


def init_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, ds_config: dict[str, Any]):
    """Start DeepSpeed on the existing process group; returns the engine."""
    prepare_cpu_backend()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def place_frozen(module: torch.nn.Module, engine, ds_config: dict[str, Any]):
    """Put a frozen module that every step runs beside the trained one (the distillation
    teacher) where the engine put the trained one: on its device, its weights in its
    precision (buffers stay fp32, as DeepSpeed keeps them). Under ZeRO-3 the module's
    weights are partitioned across the workers too, by DeepSpeed's optimizer-less ZeRO-3
    engine, and gathered per submodule as it runs, like the trained module's; so a teacher
    larger than one device fits. Returns that engine (its hooks live as long as it does),
    else None."""
    if zero_stage(ds_config) == 3:
        import deepspeed

        frozen_engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config)
        return frozen_engine
    reference = next(engine.module.parameters())
    module.to(reference.device)
    for param in module.parameters():
        param.data = param.data.to(reference.dtype)
    return None
