"""One Tune trial = one distillation, launched exactly as jobs/distill.py launches it.

Under Ray Train V2 a Tune trial is a function that starts its own TorchTrainer (Train V2
+ Tune guide): the trial process is a light driver, the training workers are scheduled
by Ray Train. Intermediate results reach Tune through a Train callback
(`EpochReportsToTune`, built on ray.tune.integration.ray_train.TuneReportCallback): each
epoch's validation record, as the shared worker loop reports it, is forwarded to the
trial's Tune session, so ASHA can stop the trial after any epoch. When Tune stops a
trial, its process dies and with it the Train controller and workers it owns (actors
are fate-shared with their owner); the workers' placement group is not, and
ReleaseStoppedTrials gives it back.

The teacher is never retrained: every trial loads the same teacher checkpoint.

Latency is measured BEFORE training, on a freshly built student: serving cost depends
on the architecture (depth, width, item count), not on trained weights, and a trial
that ASHA stops must still have its latency. It runs in the trial process (CPU) with
slmrec.speed.measure_inference at one fixed batch size and is reported to Tune with
every epoch. Trials running side by side disturb each other's timings, so the sweep's
driver times each depth again, alone, after the sweep (jobs/common/tune_report.py);
that figure is the one the winner rule and the plot use.

Each trial writes OUTPUT/trials/<trial_id>/: trial.json (settings + latency), the worker
loop's history.json, best/ (the student, a SeqRecommender checkpoint) and, when it ran
to the end, metrics.json with the test metrics. Its Ray Train run is named
trial-<trial_id>, so a trial restarted by a resumed sweep continues from its last epoch
checkpoint instead of starting over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

OBJECTIVE = "valid/NDCG@10"
TRIAL_FILE = "trial.json"
PLACEMENT_GROUP_FILE = "train_placement_group"


class EpochReportsToTune(TuneReportCallback):
    """Forward the worker loop's per-epoch records (and constants of the trial) to Tune.

    Mid-epoch checkpoint reports and the final test report carry no validation metric;
    forwarding them would hand ASHA results it skips and leave Optuna with a last result
    lacking the objective (it would mark the trial pruned), so only epoch records go."""

    def __init__(self, extras: dict[str, Any]):
        super().__init__()
        self._extras = dict(extras)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if OBJECTIVE in metrics[0]:
            super().after_report(run_context, [{**metrics[0], **self._extras}], None)


def build_task_in_trial(args: dict):
    """jobs/distill.py's build_task, after noting the worker group's placement group in
    the trial directory for ReleaseStoppedTrials."""
    from ray.util import get_current_placement_group

    from jobs.distill import build_task
    from slmrec.checkpoint import atomic_write_text

    args = dict(args)
    trial_dir = Path(args.pop("trial_dir"))
    group = get_current_placement_group()
    if group is not None:
        atomic_write_text(trial_dir / PLACEMENT_GROUP_FILE, group.id.hex())
    return build_task(args)


class ReleaseStoppedTrials(tune.Callback):
    """Give back the CPUs/GPUs of a trial's Ray Train workers when Tune ends the trial.

    When ASHA stops a trial, Tune kills the trial process and, with it, the Train
    controller; the workers' placement group outlives them (placement groups belong to
    the job, not to the actor that made them). Ray Train's own cleaner finds dead
    controllers through the state API, which needs the dashboard: without it
    (jobs/common/ray_runtime.init_local_ray starts Ray without one) every stopped trial
    kept its workers' CPUs reserved until the sweep ended. Seen here: 1.5 of 2 CPUs held
    by one live and two dead trials, no whole CPU left for a Ray Data read task, and the
    sweep stalled. A completed trial's group is already removed by its controller."""

    def __init__(self, trials_dir: str):
        self.trials_dir = trials_dir

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._release(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._release(trial.trial_id)

    def _release(self, trial_id: str) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        path = Path(self.trials_dir) / trial_id / PLACEMENT_GROUP_FILE
        if not path.is_file():
            return
        group = PlacementGroup(PlacementGroupID.from_hex(path.read_text().strip()))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)


def trial_dirname(trial) -> str:
    """Tune's directory name for a trial: its id, the same as under OUTPUT/trials/."""
    return trial.trial_id


def time_student(student, seq_len: int, batch_size: int, threads: int, repeats: int = 10) -> dict[str, Any]:
    """p50/p99 latency of one serving call (user vectors + full-ranking top-10 with the
    history excluded) for `batch_size` users of `seq_len` items, on `threads` CPU threads.
    The thread count is fixed because torch's default (all cores, or what Ray's
    OMP_NUM_THREADS says for the process) differs between a trial and the driver, and
    on a busy machine more threads can be many times slower (measured here, 2 cores at
    load ~50-60: the same 2-layer student took 214 ms with 2 threads, 17 ms with 1).
    LoRA adapters are merged into `student` first (it is changed in place), as serving
    merges them: unmerged, every adapted projection costs two extra matmuls."""
    import torch

    from slmrec.backbones import merge_lora
    from slmrec.speed import measure_inference

    merge_lora(student)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        row = measure_inference(student, student.config.num_items, seq_len, batch_sizes=(batch_size,),
                                warmup=3, repeats=repeats)[0]
    finally:
        torch.set_num_threads(before)
    return {"latency_ms": row["latency_ms_p50"], "latency_ms_p99": row["latency_ms_p99"],
            "latency_batch": batch_size, "latency_threads": threads}


def measure_latency(task_args: dict, seq_len: int, batch_size: int, threads: int) -> dict[str, Any]:
    """The trial's own timing of its (untrained) student, plus its parameter count."""
    from jobs.distill import build_task

    student = build_task(task_args).model
    params = student.parameter_counts()["total"]  # before timing merges the adapters away
    return {**time_student(student, seq_len, batch_size, threads), "params_total": params}


def run_trial(sample: dict[str, Any], *, base: dict[str, Any], teacher_dir: str, teacher_layers: int,
              max_blocks: int, splits, trials_dir: str, latency_batch: int, latency_threads: int) -> None:
    """Tune function trainable. `sample` is the point Optuna drew; `base` the fixed
    DistillConfig settings of the sweep (data, epochs, batch size, workers, ...)."""
    from jobs.common.trainer import fit, make_spec
    from jobs.common.tune_space import effective_params
    from jobs.distill import DistillConfig, task_args, validate
    from slmrec.checkpoint import atomic_write_json
    from slmrec.config import from_dict

    trial_id = tune.get_context().get_trial_id()
    out = Path(trials_dir) / trial_id
    params = effective_params(sample, teacher_layers, max_blocks)
    config = from_dict(DistillConfig, {**base, **params, "output": str(out), "teacher": teacher_dir,
                                       "probe": False, "run_name": f"trial-{trial_id}"}, f"trial {trial_id}")
    validate(config, Path(teacher_dir))
    args = task_args(config, Path(teacher_dir))
    latency = measure_latency(args, config.max_len, latency_batch, latency_threads)
    atomic_write_json(out / TRIAL_FILE, {"trial_id": trial_id, "sample": sample, "params": params,
                                         "epochs": config.epochs, **latency})
    spec = make_spec(config, str(out), splits.users - splits.too_short)
    extras = {"latency_ms": latency["latency_ms"], "student_layers": params["student_layers"],
              "blocks": params["blocks"]}
    fit(config, spec, build_task_in_trial, {**args, "trial_dir": str(out)}, splits.as_dict(), config.run_name,
        callbacks=[EpochReportsToTune(extras)])
