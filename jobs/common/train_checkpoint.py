"""Resumable checkpoints of the training loop, under every DeepSpeed ZeRO stage.

A checkpoint is one directory reported to Ray Train: rank 0 writes the trained weights,
the best weights so far and the loop state (safetensors + JSON, nothing pickled); the
AdamW moments go with them under ZeRO-0, where the client optimizer holds them whole, and
under ZeRO >= 1 each rank adds its own partition as `zero-rankN/` (Ray Train merges the
ranks' directories into one). Where DeepSpeed's optimizer steps fp32 master weights of its
own (ZeRO >= 1, bf16), those are saved too, so a bf16 run resumes bit-exact rather than
from its bf16-rounded module weights. Each rank also saves its random state as `rng-rankN/`:
reseeded instead, a resumed run would draw step 0's dropout masks again.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from slmrec.checkpoint import (load_checkpoint, optimizer_state_from_tensors, optimizer_state_to_tensors,
                               save_checkpoint)

log = logging.getLogger("slmrec.train")


@contextlib.contextmanager
def full_params(engine, zero: int, modify: bool = False):
    """Under ZeRO-3 parameters are partitioned across workers; gather them for reading
    (or writing, with `modify`) whole tensors. A no-op for lower stages."""
    if zero < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0 if modify else None):
        yield


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trained weights: on CPU `.cpu()` returns the parameter itself, which
    the optimizer goes on updating in place (and ZeRO-3 frees after a gather)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items() if n in trainable}


def _write_main(directory: str, weights: dict[str, torch.Tensor], engine, optimizer, state: dict[str, Any],
                best_weights: dict[str, torch.Tensor], zero: int) -> None:
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors.update({f"best.{k}": v for k, v in best_weights.items()})
    meta: dict[str, Any] = {"state": state, "optimizer": None}
    if zero == 0:
        # The client AdamW holds the full moments; higher stages shard them (save_zero_shard).
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
        tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        meta["optimizer"] = opt_meta
        tensors.update(_masters_to_save(_zero0_masters(engine)))
    save_checkpoint(directory, tensors, meta)


def _zero0_masters(engine) -> list[torch.Tensor] | None:
    """The full fp32 copy of the weights that ZeRO-0 under bf16 (the GPU default) steps
    beside the bf16 module; None when the module's weights are the ones stepped (fp32).
    Checkpointing only the module's weights would round them to bf16 at every resume.
    (ZeRO >= 1 steps this rank's partitions, saved with its shard.)"""
    groups = getattr(engine.optimizer, "fp32_groups", None)
    return None if groups is None else [p for group in groups for p in group]


def _masters_to_save(masters: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {f"master.{i}": m.detach().to("cpu", copy=True) for i, m in enumerate(masters or [])}


def _warn_masters(why_not: str | None, rank: int) -> None:
    if why_not:
        log.warning(f"[train] worker {rank}: fp32 master weights restart from the module's (bf16-rounded "
                    f"under bf16) weights: {why_not}")


def _restore_masters(masters: list[torch.Tensor] | None, saved: dict[str, torch.Tensor]) -> str | None:
    """Copy saved fp32 masters back (after `load_weights` refreshed them from the module's
    possibly bf16 weights); returns why not when they do not fit."""
    if not saved or masters is None:
        return None  # nothing saved (an fp32 run) or nothing to restore into
    values = [saved.get(str(i)) for i in range(len(masters))]
    if len(saved) != len(masters) or any(v is None or v.shape != m.shape for v, m in zip(values, masters)):
        return "its fp32 master weights do not match this run's layout"
    with torch.no_grad():
        for master, value in zip(masters, values):
            master.copy_(value)
    return None


def _zero_shard_dir(directory: str, rank: int) -> Path:
    return Path(directory) / f"zero-rank{rank}"


def _master_partitions(engine) -> list[torch.Tensor] | None:
    """The fp32 slices of the weights this rank's ZeRO optimizer steps (its AdamW state is
    keyed by them; DeepSpeed swaps them in and out of the AdamW's param groups, so the
    AdamW's own state_dict cannot name them); None for an optimizer we do not know."""
    opt = engine.optimizer
    # ZeRO-1/2, ZeRO-3, and ZeRO-1 under bf16 with fp32 gradient accumulation.
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(opt, name):
            return list(getattr(opt, name))
    return None


_warned_unknown: set[str] = set()


def save_zero_shard(directory: str, engine, zero: int, rank: int, world: int) -> None:
    """This rank's AdamW moments under ZeRO >= 1. Ray Train merges every rank's checkpoint
    directory into one, so each rank writes its own subdirectory."""
    partitions = _master_partitions(engine)
    if partitions is None:
        # Losing the moments on a resume beats failing the run at its first checkpoint.
        kind = type(engine.optimizer).__name__
        if kind not in _warned_unknown:
            _warned_unknown.add(kind)
            log.warning(f"[train] worker {rank}: DeepSpeed optimizer {kind} has no fp32 partitions this code "
                        "knows; checkpoints leave its AdamW moments out (a resume restarts them from zero)")
        return
    state = engine.optimizer.optimizer.state
    tensors = {f"{i}.{k}": (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else torch.tensor(v))
               for i, p in enumerate(partitions) for k, v in state.get(p, {}).items()}
    tensors.update(_masters_to_save(partitions))
    save_checkpoint(_zero_shard_dir(directory, rank), tensors,
                    {"world_size": world, "zero_stage": zero, "partition_sizes": [p.numel() for p in partitions]})


def _rng_dir(directory: str, rank: int) -> Path:
    return Path(directory) / f"rng-rank{rank}"


def save_rng(directory: str, rank: int, world: int) -> None:
    """This rank's random state (dropout masks are drawn from it)."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(_rng_dir(directory, rank), tensors, {"world_size": world})


def restore_rng(directory: str, rank: int, world: int) -> str | None:
    """Continue this rank's random state; returns why not when it cannot."""
    path = _rng_dir(directory, rank)
    if not path.is_dir():
        return "the checkpoint has no random state for this worker"
    tensors, meta = load_checkpoint(path)
    if meta["world_size"] != world:
        return f"it was saved by {meta['world_size']} workers, this run has {world}"
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return None


def restore_zero_shard(directory: str, engine, zero: int, rank: int, world: int) -> str | None:
    """Load this rank's AdamW moments; returns why not when they cannot be used."""
    shard = _zero_shard_dir(directory, rank)
    if not shard.is_dir():
        return "the checkpoint has no optimizer partition for this worker"
    tensors, meta = load_checkpoint(shard)
    partitions = _master_partitions(engine)
    if partitions is None:
        return f"DeepSpeed optimizer {type(engine.optimizer).__name__} has no fp32 partitions this code knows"
    if (meta["world_size"], meta["zero_stage"]) != (world, zero):
        return (f"its optimizer partitions were saved by {meta['world_size']} workers under "
                f"ZeRO-{meta['zero_stage']}, this run has {world} under ZeRO-{zero}")
    sizes = [p.numel() for p in partitions]
    if meta["partition_sizes"] != sizes:
        return f"its optimizer partitions hold {meta['partition_sizes']} weights, this worker's {sizes}"
    state = engine.optimizer.optimizer.state
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        if i == "master":
            continue
        partition = partitions[int(i)]
        # AdamW keeps its step count on the CPU whatever the weights' device.
        state[partition][name] = value if value.dim() == 0 else value.to(partition.device)
    _warn_masters(_restore_masters(partitions, _with_prefix(tensors, "master.")), rank)
    return None


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights(engine, zero: int, weights: dict[str, torch.Tensor], source: str) -> None:
    """Put trained weights into the engine's module, on every rank."""
    with full_params(engine, zero, modify=True):
        missing = {n for n, p in engine.module.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise ValueError(f"{source} lacks trained weights {sorted(missing)[:5]}")
        engine.module.load_state_dict(weights, strict=False)
    # DeepSpeed's ZeRO and bf16 optimizers step an fp32 master copy of the weights that they
    # hold themselves: left stale, their next step would put the old weights back.
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def restore(directory: str, engine, optimizer, zero: int, rank: int,
            world: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights, optimizer moments and loop state; returns (state, best weights)."""
    tensors, meta = load_checkpoint(directory)
    load_weights(engine, zero, _with_prefix(tensors, "model."), f"checkpoint {directory}")
    if zero == 0:
        if meta.get("optimizer") is not None:
            optimizer.load_state_dict(optimizer_state_from_tensors(_with_prefix(tensors, "optim."),
                                                                   meta["optimizer"]))
        _warn_masters(_restore_masters(_zero0_masters(engine), _with_prefix(tensors, "master.")), rank)
    else:
        why_not = restore_zero_shard(directory, engine, zero, rank, world)
        if why_not:
            log.warning(f"[train] worker {rank}: AdamW moments restart from zero: {why_not}")
    why_not = restore_rng(directory, rank, world)
    if why_not:
        log.warning(f"[train] worker {rank}: random state restarts from the seed: {why_not}")
    return meta["state"], _with_prefix(tensors, "best.")


def report(metrics: dict[str, float], checkpoint_state: dict[str, Any] | None,
           best_weights: dict[str, torch.Tensor], engine, optimizer, zero: int, rank: int, world: int) -> None:
    """Report metrics; with a state, also a resumable checkpoint: rank 0 writes the weights
    and loop state, and under ZeRO >= 1 every rank its optimizer partition."""
    import ray.train

    if checkpoint_state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "ckpt")
        write_checkpoint(directory, checkpoint_state, best_weights, engine, optimizer, zero, rank, world)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def write_checkpoint(directory: str, state: dict[str, Any], best_weights: dict[str, torch.Tensor], engine,
                     optimizer, zero: int, rank: int, world: int) -> None:
    """This rank's part of a resumable checkpoint under `directory` (the ranks' parts
    together make one)."""
    # Gathering ZeRO-3's partitioned weights is collective: every rank joins, rank 0 copies.
    with full_params(engine, zero):
        weights = trainable_state(engine.module) if rank == 0 else {}
    if rank == 0:
        _write_main(directory, weights, engine, optimizer, state, best_weights, zero)
    if zero > 0:
        save_zero_shard(directory, engine, zero, rank, world)
    save_rng(directory, rank, world)
