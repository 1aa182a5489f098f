"""Settings shared by the training jobs, as dataclass mixins: a job's config class
inherits the groups it needs, and `slmrec.config.parse_config` turns every field into
a documented flag."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from slmrec.config import field


@dataclass(kw_only=True)
class DataFlags:
    data: str = field(help="prepared data directory (output of jobs/prepare.py)")
    output: str = field(help="output directory of this stage (model, metrics, report)")
    max_len: int = field(50, help="most recent items of a history fed to the model")


@dataclass(kw_only=True)
class TrainFlags:
    epochs: int = field(3, help="training epochs")
    batch_size: int = field(64, help="micro-batch of user sequences per worker and step")
    grad_accum: int = field(1, help="gradient accumulation steps (effective batch = batch x accum x workers)")
    lr: float = field(1e-3, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(100, help="linear warm-up steps before cosine decay (lr 1e-3 diverges without)")
    num_workers: int = field(1, help="Ray Train workers (processes); each runs one DeepSpeed rank")
    cpus_per_worker: float = field(1.0, help="CPUs reserved per worker (leave some for Ray Data)")
    torch_threads: int = field(0, help="torch threads per worker (0: as many as CPUs reserved for it); more than "
                                       "--cpus-per-worker lets a small machine train on every core while Ray "
                                       "Data keeps a CPU to stream the data")
    length_bucket_window: int = field(16, help="sort the rows of every N consecutive batches by history length, "
                                               "so a batch pads only to its own longest row (0: keep the "
                                               "shuffled order; all-padding columns are cut either way). "
                                               "Losses are per-batch means, so buckets weigh short histories' "
                                               "positions more (README, 'Padding')")
    bf16_autocast: bool = field(False, help="bf16 mixed precision (torch.autocast) in the workers: ~1.6x faster "
                                            "training on CPUs with AVX512-BF16/AMX, several times slower without "
                                            "them (the workers warn); weights, optimizer state and ranking stay "
                                            "fp32 (GPU workers get bf16 from the DeepSpeed config)")
    use_gpu: bool = field(False, help="one GPU per worker; bf16 when the DeepSpeed config says auto")
    deepspeed_config: str = field("cluster/deepspeed/zero0.json",
                                  help="DeepSpeed JSON (ZeRO stage, clipping, bf16); batch sizes are filled in. "
                                       "Shipped: cluster/deepspeed/zero0.json, zero2.json (optimizer state "
                                       "and gradients sharded), zero3.json (weights too), zero3_offload.json "
                                       "(sharded state kept in CPU memory)")
    seed: int = field(0, help="random seed (model init, shuffling, sampled negatives)")
    run_name: Optional[str] = field(None, help="Ray Train run name; rerunning with the same name resumes "
                                              "(default: derived from --output)")
    storage_path: Optional[str] = field(None, help="where Ray Train keeps checkpoints; shared storage "
                                                  "(NFS, s3://, gs://) on multi-node clusters (default: OUTPUT/ray)")
    max_failures: int = field(0, help="worker failures tolerated; training resumes from the last checkpoint")
    checkpoint_every_steps: int = field(0, help="also checkpoint every N steps (0: once per epoch)")
    eval_batch_size: int = field(256, help="users per evaluation batch")
    valid_fraction: float = field(1.0, help="share of users (a fixed hash-chosen subset) validated after each "
                                            "epoch to pick the best one; the final test always scores every user")
    train_on_valid: bool = field(False, help="also train on each user's validation item, holding out only the "
                                             "test item as the generative-recommenders protocol does; nothing is "
                                             "left to validate on, so the last epoch is kept and tested")
    mask_history: bool = field(False, help="validate (pick the best epoch) with each user's history items "
                                           "excluded from full ranking, as generative-recommenders' evaluation "
                                           "does; the final test reports both ways")
    sampled_negatives: int = field(999, help="negatives of the sampled protocol (target + N uniform non-history)")
    log_every: int = field(20, help="progress line every N steps")
    fail_after_steps: int = field(0, help="fault injection for resume tests: raise after N optimiser steps "
                                          "(0: never)")


@dataclass(kw_only=True)
class ItemTableFlags:
    item_table: Optional[str] = field(None, help="frozen item table: a jobs/pretrain_items.py output directory "
                                                 "(default: train it first, under OUTPUT/items)")
    item_dim: int = field(128, help="item embedding width (SASRec stage 0)")
    item_epochs: int = field(20, help="SASRec epochs when the item table is trained first")
    item_dropout: float = field(0.5, help="SASRec dropout when the item table is trained first (the paper's "
                                          "~0.5)")


def inherited_settings(source: Any, stage: type, own: set[str]) -> dict[str, Any]:
    """The settings a stage that a job starts itself (`stage`, a config class) takes from
    the job's config: every field of `stage` except `own`, which the caller sets. A field
    of `stage` that the job's config lacks fails here, so a new one needs a decision."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(stage) if f.name not in own}
