"""Launch the shared worker loop on Ray Train (TorchTrainer + DeepSpeed in the workers).

Rerunning with the same run name and storage path resumes from the last checkpoint:
Train V2 restores a run by (storage_path, name).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from jobs.common.deepspeed_engine import load_ds_config, resolve_ds_config
from jobs.common.flags import TrainFlags
from jobs.common.ray_runtime import check_cpus_left_for_reads, check_gpus
from jobs.common.train_worker import TrainSpec, train_loop


def make_spec(flags: TrainFlags, output_dir: str, train_rows: int, **overrides: Any) -> TrainSpec:
    # One optimiser step needs grad_accum whole micro-batches on every worker; with fewer,
    # no step would ever be taken and the gradient would pile up across epochs.
    if train_rows // flags.num_workers < flags.batch_size * flags.grad_accum:
        raise ValueError(f"{train_rows} training users over {flags.num_workers} worker(s) cannot fill one "
                         f"optimiser step of --batch-size {flags.batch_size} x --grad-accum {flags.grad_accum}; "
                         "lower them or add data")
    ds_config = resolve_ds_config(load_ds_config(flags.deepspeed_config), flags.batch_size, flags.grad_accum,
                                  flags.num_workers)
    spec = TrainSpec(
        output_dir=str(Path(output_dir).resolve()), epochs=flags.epochs, lr=flags.lr,
        weight_decay=flags.weight_decay, warmup_steps=flags.warmup_steps, micro_batch=flags.batch_size,
        grad_accum=flags.grad_accum, train_rows=train_rows, ds_config=ds_config,
        eval_batch=flags.eval_batch_size, mask_history=flags.mask_history,
        sampled_negatives=flags.sampled_negatives, seed=flags.seed, log_every=flags.log_every,
        checkpoint_every_steps=flags.checkpoint_every_steps, stop_after_steps=flags.fail_after_steps,
        torch_threads=flags.torch_threads, length_window=flags.length_bucket_window,
        bf16_autocast=flags.bf16_autocast, train_on_valid=flags.train_on_valid)
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def _check_cpus_left_for_data(flags: TrainFlags) -> None:
    """Train V2 keeps Ray Data off the CPUs its workers reserve."""
    check_cpus_left_for_reads(flags.num_workers * flags.cpus_per_worker,
                              f"--num-workers {flags.num_workers} x --cpus-per-worker {flags.cpus_per_worker:g}",
                              "reserve fewer and use --torch-threads to train on more cores")


def check_worker_gpus(flags: TrainFlags) -> None:
    """--use-gpu asks one GPU per worker; ValueError where a local Ray has too few (on a
    cluster the wait is announced)."""
    if flags.use_gpu:
        check_gpus(flags.num_workers, f"--use-gpu with --num-workers {flags.num_workers}")


def run_name_for(output_dir: str, explicit: str | None) -> str:
    return explicit or Path(output_dir).resolve().name


def training_data_config():
    """Only training data is split; every worker scores its stride of the evaluation users
    so that none is dropped by an equal split. The split is deterministic: blocks reach it
    in read order (not in the order their tasks finish), and it hands each to the worker
    with the fewest rows so far, so every run gives each worker the same rows in the same
    order, and a resume that skips the batches an epoch had trained skips exactly those."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def fit(flags: TrainFlags, spec: TrainSpec, build_task: Callable[[dict], Any], task_args: dict,
        datasets: dict, run_name: str, callbacks: Sequence[Any] = ()):
    """Run the training loop on `flags.num_workers` Ray Train workers; returns the Result.
    `callbacks` are Ray Train UserCallbacks (Tune passes one that forwards each report)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:  # a job that would wait forever for its workers ends here, with the reason
        _check_cpus_left_for_data(flags)
        check_worker_gpus(flags)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    storage = flags.storage_path or str(Path(spec.output_dir) / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
        os.makedirs(storage, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "build_task": build_task, "task_args": task_args},
        scaling_config=ScalingConfig(num_workers=flags.num_workers, use_gpu=flags.use_gpu,
                                     resources_per_worker={"CPU": flags.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if flags.use_gpu else "gloo"),
        dataset_config=training_data_config(),
        datasets=datasets,
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=flags.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks)),
    )
    return trainer.fit()
