"""The Ray Train worker loop shared by every training stage (SASRec, teacher, student).

Each worker builds its task (model + loss) from a picklable builder, wraps the trained
module in a DeepSpeed engine, reads its shard of the training data from Ray Data, and
every epoch evaluates on the validation users, keeps the best model (by validation
NDCG@10) under `output_dir/best`, and reports a resumable checkpoint to Ray Train.
After the last epoch the best model is evaluated on the test users.

Validation and test sets are not split by Ray Train: every worker iterates the whole
(small) set and scores every world_size-th batch, then the metric sums are
all-reduced, so each user counts exactly once whatever the number of workers.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from jobs.common.progress import Progress
from jobs.common.train_checkpoint import full_params, load_weights, report, restore, trainable_state
from slmrec.bucketing import length_buckets
from slmrec.checkpoint import atomic_write_json
from slmrec.evaluation import EvalProtocol, evaluate_batches, reported_protocols
from slmrec.metrics import MetricSums
from slmrec.precision import bf16_autocast_warning
from slmrec.schedule import resume_at, warmup_cosine
from slmrec.tasks import Task

BEST_METRIC = "NDCG@10"

# A logger, not print: Train V2 forwards a worker's print both to the console and through
# its logging, so every printed line reached the driver twice.
log = logging.getLogger("slmrec.train")


@dataclass
class TrainSpec:
    """Everything the worker loop needs besides the task; plain data so Ray can ship it."""

    output_dir: str
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    micro_batch: int = 64
    grad_accum: int = 1
    train_rows: int = 0  # rows of the training dataset, for the schedule and the ETA
    ds_config: dict = field(default_factory=dict)
    eval_batch: int = 256
    sampled_negatives: int = 999
    mask_history: bool = False
    seed: int = 0
    log_every: int = 20
    shuffle_buffer: int = 2048
    torch_threads: int = 0  # 0: leave torch's default (Ray sets it from the worker's CPUs)
    length_window: int = 16  # batches whose rows are sorted by length together (<= 1: trim only)
    bf16_autocast: bool = False
    train_on_valid: bool = False  # validation targets are trained on: no validation, last epoch kept
    checkpoint_every_steps: int = 0  # 0: once per epoch
    stop_after_steps: int = 0  # >0: stop (as if killed) after this many steps; for tests


def _rank_world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of `t` over the workers, computed on `device`: NCCL (GPU workers) reduces CUDA
    tensors only, and metric sums are kept on the CPU."""
    t = t.to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


_COUNT = "#micro-batches"  # summed beside the loss terms; no term has this name


def summed_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every worker's values added up, by name (collective: every rank calls it with the
    same names)."""
    names = sorted(values)
    totals = all_reduce_sum(torch.tensor([values[k] for k in names], dtype=torch.float64), device)
    return dict(zip(names, totals.tolist()))


def epoch_means(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Each loss term's mean over every worker's micro-batches (not rank 0's share alone),
    from this worker's sums over its `count` micro-batches."""
    totals = summed_over_workers({**sums, _COUNT: float(count)}, device)
    pooled_count = totals.pop(_COUNT)
    return {k: v / pooled_count for k, v in totals.items()}


def carried_sums(saved: dict[str, float], rank: int) -> dict[str, float]:
    """A mid-epoch checkpoint holds every worker's loss sums added up (rank 0 writes it):
    resumed, rank 0 carries them and the others start from zero, under the same names."""
    return {k: v if rank == 0 else 0.0 for k, v in saved.items()}


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _autocast(spec: TrainSpec) -> torch.autocast:
    return torch.autocast(_device().type, dtype=torch.bfloat16, enabled=spec.bf16_autocast)


@dataclass
class _AutocastRanker:
    """User vectors from a bf16-autocast forward, ranked in fp32: bf16 scores would tie
    many items and move the metrics."""

    task: Task
    spec: TrainSpec

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        with _autocast(self.spec):
            return self.task.user_vectors(items).float()

    def item_table(self) -> torch.Tensor:
        return self.task.item_table()


class _Share:
    """Every world-th batch of a stream that every rank reads whole, starting at `rank`."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world
        self.seen, self.taken, self.last = 0, 0, None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i, batch in enumerate(self.batches):
            self.seen, self.last = i + 1, batch
            if i % self.world == self.rank:
                self.taken += 1
                yield batch

    def short_by(self) -> int:
        """Batches fewer than rank 0 took (0 or 1), once the stream is exhausted."""
        return -(-self.seen // self.world) - self.taken


def _evaluate(task: Task, split: str, spec: TrainSpec, protocols: list[EvalProtocol], rank: int,
              world: int) -> list[dict[str, float]]:
    """Metrics of every protocol on one split, from a single forward pass per batch."""
    import ray.train

    shard = ray.train.get_dataset_shard(split)
    share = _Share(shard.iter_torch_batches(batch_size=spec.eval_batch, dtypes=torch.long, device=_device()),
                   rank, world)
    ranker = _AutocastRanker(task, spec)
    task.model.eval()
    with torch.no_grad():
        per_protocol = evaluate_batches(ranker, length_buckets(share, spec.length_window), protocols)
        # ZeRO-3 gathers each module's weights collectively as it runs, so every rank must
        # run as many forwards as the busiest one; the extra one's vectors are not counted.
        for _ in range(share.short_by()):
            ranker.user_vectors(share.last["items"])
    task.model.train()
    return [MetricSums.from_tensor(all_reduce_sum(sums.as_tensor(), _device())).result() for sums in per_protocol]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` = {"spec": TrainSpec, "build_task": callable,
    "task_args": dict}."""
    import ray.train

    from jobs.common.deepspeed_engine import init_engine, place_frozen, resolve_precision, zero_stage

    spec: TrainSpec = config["spec"]
    build_task: Callable[[dict], Task] = config["build_task"]
    rank, world = _rank_world()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(spec.seed)
    task = build_task(config["task_args"])
    device = _device()
    # This worker's copy of the spec; metrics.json records the config as resolved here.
    spec.ds_config = resolve_precision(spec.ds_config, device)
    task.model.to(device)
    slow_bf16 = spec.bf16_autocast and bf16_autocast_warning(device.type)
    if slow_bf16 and rank == 0:
        log.warning(f"[train] {slow_bf16}")

    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    rows_per_worker = max(1, spec.train_rows // world)
    steps_per_epoch = max(1, rows_per_worker // (spec.micro_batch * spec.grad_accum))
    total_steps = steps_per_epoch * spec.epochs
    micro_per_epoch = steps_per_epoch * spec.grad_accum
    scheduler = warmup_cosine(optimizer, min(spec.warmup_steps, total_steps // 2), total_steps)
    engine = init_engine(task.model, optimizer, scheduler, spec.ds_config)
    zero = zero_stage(spec.ds_config)
    # The engine may re-wrap the module (ZeRO-3 partitions it); the task must use it.
    task.model = engine.module
    # Held until the loop returns: a collected DeepSpeed engine removes its module's hooks.
    frozen_engines = [place_frozen(module, engine, spec.ds_config) for module in task.frozen_modules()]  # noqa: F841

    state = {"epoch": 0, "global_step": 0, "best": -1.0, "best_epoch": -1, "history": [], "steps": []}
    best_weights: dict[str, torch.Tensor] = {}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state, best_weights = restore(d, engine, optimizer, zero, rank, world)
        resume_at(scheduler, state["global_step"])
        if rank == 0:
            log.info(f"[train] resumed at epoch {state['epoch']} step {state['global_step']}")

    out = Path(spec.output_dir)
    shard = ray.train.get_dataset_shard("train")
    # After a mid-epoch checkpoint, as many of that epoch's batches as were trained before
    # it are skipped and its running loss sums carried on, so the resumed run does not run
    # past the schedule's last step. They are the rows trained before: the split hands
    # every worker the same blocks in the same order each run (trainer.training_data_config)
    # and the epoch's shuffle is seeded.
    done_in_epoch = state.pop("epoch_step", 0)
    carried = carried_sums(state.pop("epoch_sums", {}), rank)
    carried_seconds = state.pop("epoch_seconds", 0.0)  # so a resumed epoch's time is the whole epoch's
    progress = Progress(epochs=spec.epochs, steps_per_epoch=steps_per_epoch, first_step=state["global_step"],
                        every=spec.log_every, rank=rank, records=state["steps"])
    for epoch in range(state["epoch"], spec.epochs):
        epoch_start = time.time() - carried_seconds
        engine.train()
        sums: dict[str, float] = carried
        n_steps = done_in_epoch
        batches = shard.iter_torch_batches(
            batch_size=spec.micro_batch, dtypes=torch.long, device=device, drop_last=True,
            local_shuffle_buffer_size=spec.shuffle_buffer, local_shuffle_seed=spec.seed + epoch)
        group: dict[str, float] = {}
        for step, batch in enumerate(length_buckets(batches, spec.length_window, seed=spec.seed + epoch), start=1):
            # `step` counts micro-batches; the optimiser steps once every grad_accum of them.
            # Micro-batches past the epoch's last whole accumulation are read and not
            # trained on, so no half-accumulated gradient spills into the next epoch (or is
            # lost at a checkpoint: DeepSpeed's micro-step count restarts on resume).
            if step <= done_in_epoch or step > micro_per_epoch:
                continue
            with _autocast(spec):
                terms = task.loss(batch)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(terms.total)
            engine.step()
            n_steps += 1
            for k, v in terms.as_dict().items():
                sums[k] = sums.get(k, 0.0) + v
                group[k] = group.get(k, 0.0) + v / spec.grad_accum
            if not boundary:
                continue
            state["global_step"] += 1
            progress.step(epoch, step // spec.grad_accum, state["global_step"],
                          batch["items"].shape[0] * world * spec.grad_accum, group)
            group = {}
            if spec.stop_after_steps and state["global_step"] >= spec.stop_after_steps:
                raise RuntimeError(f"stop_after_steps={spec.stop_after_steps} reached (fault injection)")
            if spec.checkpoint_every_steps and state["global_step"] % spec.checkpoint_every_steps == 0:
                report({"epoch": epoch, "step": state["global_step"]},
                       dict(state, epoch=epoch, epoch_step=step, epoch_sums=summed_over_workers(sums, device),
                            epoch_seconds=time.time() - epoch_start),
                       best_weights, engine, optimizer, zero, rank, world)
        done_in_epoch, carried, carried_seconds = 0, {}, 0.0
        if n_steps == 0:
            raise ValueError(f"worker {rank}: no training batch of {spec.micro_batch} rows in epoch {epoch + 1}; "
                             "lower --batch-size or add data")
        train_terms = {f"train/{k}": v for k, v in epoch_means(sums, n_steps, device).items()}
        epoch_seconds = time.time() - epoch_start
        # Validation targets that were trained on say nothing about generalisation, so such
        # a run is not validated and keeps its newest epoch.
        valid = {} if spec.train_on_valid else _evaluate(
            task, "valid", spec, [EvalProtocol("full", mask_history=spec.mask_history)], rank, world)[0]
        record = {"epoch": epoch + 1, "epoch_seconds": epoch_seconds, **train_terms,
                  **{f"valid/{k}": v for k, v in valid.items()}}
        state["history"].append(record)
        if spec.train_on_valid or valid[BEST_METRIC] > state["best"]:
            # Metrics are all-reduced, so every rank takes the same decision and keeps the
            # same best weights for the final test.
            state["best"], state["best_epoch"] = valid.get(BEST_METRIC), epoch + 1
            with full_params(engine, zero):
                best_weights = trainable_state(engine.module)
                if rank == 0:
                    task.save(str(out / "best"))
        state["epoch"] = epoch + 1
        if rank == 0:
            atomic_write_json(out / "history.json", state["history"])
            verdict = ("not validated (validation targets trained on)" if spec.train_on_valid else
                       f"valid {BEST_METRIC}={valid[BEST_METRIC]:.4f} (best {state['best']:.4f} "
                       f"at epoch {state['best_epoch']})")
            log.info(f"[train] epoch {epoch + 1}/{spec.epochs} {epoch_seconds:.1f}s {verdict}")
        report(record, state, best_weights, engine, optimizer, zero, rank, world)

    _final_test(task, spec, state, best_weights, engine, optimizer, zero, rank, world, out)


def _final_test(task: Task, spec: TrainSpec, state: dict[str, Any], best_weights: dict[str, torch.Tensor],
                engine, optimizer, zero: int, rank: int, world: int, out: Path) -> None:
    """Evaluate the best model (by validation; the last one without) on the test users
    under every protocol."""
    load_weights(engine, zero, best_weights, "the best weights")
    protocols = reported_protocols(spec.sampled_negatives, spec.seed)
    results = {f"test_{protocol.label}/{k}": v
               for protocol, metrics in zip(protocols, _evaluate(task, "test", spec, protocols, rank, world))
               for k, v in metrics.items()}
    final = {"best_epoch": state["best_epoch"], f"best_valid/{BEST_METRIC}": state["best"], **results}
    if rank == 0:
        atomic_write_json(out / "metrics.json", {"final": final, "history": state["history"], "steps": state["steps"],
                                                 "spec": {k: v for k, v in asdict(spec).items() if k != "ds_config"},
                                                 "deepspeed": spec.ds_config})
        log.info("[train] test " + json.dumps({k: round(v, 4) for k, v in results.items()}))
    # No checkpoint: the best weights are loaded now, and a checkpoint of them would be the
    # one a rerun with more --epochs resumes from, dropping every epoch after the best.
    report({**final, "done": 1}, None, best_weights, engine, optimizer, zero, rank, world)
