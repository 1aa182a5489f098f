"""Stage 2b: search the student's depth, distillation loss weights and learning rate with
Ray Tune over real distillations, and hand the chosen student over to serving.

Each trial is one jobs/distill.py run (same build_task, validation and Ray Train worker
loop) against ONE shared teacher checkpoint. Optuna TPE proposes points; ASHA stops
trials whose validation NDCG@10 (reported every epoch) trails the others at a rung.
Every trial also measures its student's serving latency at a fixed batch size and
reports it; after the sweep the driver times each depth again, alone (trials running
side by side disturb each other's timings), and the plot and winner use that figure.

Local (tiny data; 2 trials at a time on 2 CPUs):
    python jobs/tune.py --data out/tiny --teacher runs/teacher --output runs/tune \\
        --num-samples 4 --student-layers 1 2 --epochs 3 --batch-size 16 --cpus-per-worker 0.5
On a cluster (see cluster/tune_example.yaml for a frozen sweep and its command):
    ray job submit --working-dir . -- python jobs/tune.py --config cluster/tune_example.yaml

Writes OUTPUT/trials.parquet + trials.md (one row per trial), pareto.png (quality vs
latency, depth labelled), winner.json (rule, settings, scores, "model": the student
directory that `jobs/serve.py --model PATH` takes as-is) and serve.yaml
(`python jobs/serve.py --config OUTPUT/serve.yaml`). Winner rule: jobs/common/winner.py.
Rerunning with the same --output and --name resumes an interrupted sweep (finished
trials are kept, unfinished ones continue from their last epoch checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common.flags import DataFlags, TrainFlags  # noqa: E402
from jobs.common.job_paths import refuse_relative_paths_if_submitted  # noqa: E402
from slmrec.config import field, parse_config  # noqa: E402


@dataclass(kw_only=True)
class TuneConfig(DataFlags, TrainFlags):
    teacher: str = field(help="teacher: a jobs/train_teacher.py output directory (or its best/), shared by all trials")
    num_samples: int = field(8, help="trials (points drawn by Optuna TPE)")
    name: Optional[str] = field(None, help="sweep name; rerunning with the same --output and --name resumes it "
                                           "(default: the --output directory's name)")
    student_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6],
                                      help="student depths to search (each <= the teacher's depth)")
    blocks: int = field(4, help="most blocks B; each trial uses the largest divisor of gcd(teacher, student "
                                "depth) <= B, so blocks stay equal on both sides")
    lr_range: tuple[float, float] = field((1e-4, 3e-3), help="learning rate, log-uniform LO HI (LO == HI: fixed)")
    cos_range: tuple[float, float] = field((0.1, 10.0), help="direction alignment weight, log-uniform LO HI")
    l2_range: tuple[float, float] = field((0.01, 1.0), help="norm term weight, log-uniform LO HI")
    ms_range: tuple[float, float] = field((0.1, 10.0), help="multiple supervision weight, log-uniform LO HI")
    allow_zero_weights: bool = field(True, help="each loss weight may also be exactly 0 (an on/off switch "
                                                "sampled with it)")
    start_points: list[str] = field(default_factory=list, help="JSON points evaluated before Optuna samples, "
                                    "in distillation terms, e.g. '{\"student_layers\": 4, \"lr\": 0.001, "
                                    "\"cos_weight\": 1, \"l2_weight\": 0.1, \"ms_weight\": 1}' (the paper's)")
    norm_mode: Literal["distance", "norm"] = field("distance", help="norm term: ||h_s - h_t|| or | ||h_s|| - ||h_t|| |")
    student_init: Literal["fresh", "teacher"] = field("fresh", help="fresh student weights or the teacher's first layers")
    student_finetuning: Literal["teacher", "full"] = field("teacher", help="student backbone: LoRA as the teacher "
                                                                         "or full fine-tuning (see jobs/distill.py)")
    kd_weight: float = field(0.0, help="logit distillation weight, the same in every trial (see jobs/distill.py; "
                                       "not in the paper)")
    kd_temperature: float = field(1.0, help="softmax temperature of the logit distillation term")
    epochs: int = field(5, help="epochs per trial (ASHA's max_t)")
    warmup_steps: int = field(50, help="linear warm-up steps before cosine decay")
    grace_period: int = field(1, help="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: int = field(2, help="ASHA: keep the top 1/factor of trials at each rung")
    max_concurrent: int = field(0, help="trials at once (0: as many as the cluster's CPUs/GPUs fit now, see "
                                        "--trial-cpus and --data-cpus; set it on an autoscaling cluster)")
    trial_cpus: float = field(0.0, help="CPUs reserved for each trial's driver process (it only launches the "
                                        "TorchTrainer and times the student)")
    trial_memory_gb: float = field(0.5, help="memory reserved for each trial's driver process (it builds the "
                                             "student from the teacher checkpoint to time it)")
    data_cpus: float = field(1.0, help="CPUs kept free for Ray Data read tasks when sizing --max-concurrent 0")
    latency_batch: int = field(32, help="users per serving call when timing each student")
    latency_threads: int = field(1, help="CPU threads when timing each student (a Serve replica's default "
                                         "is one CPU)")
    max_latency_ms: Optional[float] = field(None, help="winner: only students at most this slow (p50 at "
                                                       "--latency-batch)")
    tolerance: float = field(0.0, help="winner: the shallowest student within this much validation NDCG@10 "
                                       "of the best feasible one")
    tune_max_failures: int = field(0, help="times Tune restarts a failed trial")
    retry_errored: bool = field(False, help="on a rerun of an existing sweep, run its errored trials again "
                                            "(off: a rerun resumes interrupted trials only, so rerunning a "
                                            "finished sweep to re-pick the winner trains nothing)")


def _ranges(config: TuneConfig):
    from jobs.common.tune_space import check_range

    # Inherited from the training flags but owned by the sweep here: refuse rather than ignore.
    if config.lr != TrainFlags.lr or config.run_name is not None:
        raise ValueError("jobs/tune.py searches the learning rate (--lr-range) and names runs itself "
                         "(--name); --lr and --run-name do not apply")
    lr = check_range("lr", config.lr_range, allow_zero_fixed=False)
    weights = {name: check_range(name, getattr(config, f"{name}_range"), allow_zero_fixed=True)
               for name in ("cos", "l2", "ms")}
    return lr, weights


def _start_points(config: TuneConfig) -> list[dict]:
    import json

    from jobs.common.tune_space import start_point

    lr, weights = _ranges(config)
    points = []
    for text in config.start_points:
        try:
            point = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--start-points {text!r}: not JSON ({e})") from e
        if not isinstance(point, dict):
            raise ValueError(f"--start-points {text!r}: expected a JSON object")
        points.append(start_point(point, config.student_layers, lr, weights, config.allow_zero_weights))
    return points


def check_config(config: TuneConfig, teacher_layers: int) -> None:
    """Fail before Ray starts: sample count, depths, ranges, winner bounds."""
    from jobs.common.tune_space import blocks_for

    if config.num_samples < 1:
        raise SystemExit(f"--num-samples must be >= 1, got {config.num_samples}")
    if config.train_on_valid:
        raise SystemExit("--train-on-valid: a sweep ranks its trials by validation NDCG@10, which needs the "
                         "validation targets held out")
    if not config.student_layers or len(set(config.student_layers)) != len(config.student_layers):
        raise SystemExit(f"--student-layers needs distinct depths, got {config.student_layers}")
    too_deep = [d for d in config.student_layers if not 1 <= d <= teacher_layers]
    if too_deep:
        raise SystemExit(f"--student-layers {too_deep}: must be in 1..{teacher_layers} (the teacher's depth); "
                         f"valid here: {list(range(1, teacher_layers + 1))}")
    try:
        _start_points(config)
        for depth in config.student_layers:
            blocks_for(teacher_layers, depth, config.blocks)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if config.latency_batch < 1 or config.latency_threads < 1:
        raise SystemExit(f"--latency-batch and --latency-threads must be >= 1, got {config.latency_batch} "
                         f"and {config.latency_threads}")
    if not (math.isfinite(config.tolerance) and config.tolerance >= 0):
        raise SystemExit(f"--tolerance must be a number >= 0, got {config.tolerance}")
    if config.max_latency_ms is not None and not (math.isfinite(config.max_latency_ms)
                                                  and config.max_latency_ms > 0):
        raise SystemExit(f"--max-latency-ms must be a number > 0, got {config.max_latency_ms}")
    for flag in ("max_concurrent", "trial_cpus", "trial_memory_gb", "data_cpus"):
        if not getattr(config, flag) >= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(config, flag)}")
    if config.grace_period < 1 or config.grace_period > config.epochs or config.reduction_factor < 2:
        raise SystemExit(f"ASHA needs 1 <= --grace-period <= --epochs and --reduction-factor >= 2, got "
                         f"{config.grace_period}, {config.epochs}, {config.reduction_factor}")


def _base_settings(config: TuneConfig) -> dict:
    """The sweep's fixed settings, as DistillConfig fields (sampled ones are added per trial)."""
    shared = {f.name for cls in (DataFlags, TrainFlags) for f in dataclasses.fields(cls)}
    base = {name: getattr(config, name) for name in shared}
    base.update(norm_mode=config.norm_mode, student_init=config.student_init, warmup_steps=config.warmup_steps,
                student_finetuning=config.student_finetuning, kd_weight=config.kd_weight,
                kd_temperature=config.kd_temperature)
    base.pop("run_name", None)
    return base


# Settings a finished or interrupted sweep may be rerun with changed: they only choose the
# winner among trials already run, or whether errored ones run again. Everything else must
# match, or the resumed sweep would silently mix trials of two different searches.
RESELECTABLE = ("max_latency_ms", "tolerance", "retry_errored")


def check_same_sweep(config: TuneConfig, settings_file: Path) -> None:
    """On resume, the sweep's settings must be those it started with (saved at start)."""
    import json

    current = json.loads(json.dumps(dataclasses.asdict(config)))
    saved = json.loads(settings_file.read_text())
    changed = sorted(k for k in set(current) | set(saved)
                     if k not in RESELECTABLE and current.get(k) != saved.get(k))
    if changed:
        raise SystemExit(f"sweep settings differ from those {settings_file} was started with: "
                         + ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                         + "; rerun with the original settings to resume, or pick a new --name")


def record_or_check_settings(config: TuneConfig, settings_file: Path, experiment: str) -> None:
    """Record the settings a sweep starts with; a resume must keep them. Only Tune's saved
    state makes a rerun a resume: a first run that died before Tune saved any (a bad
    path, say) starts again, with the settings it is given now."""
    from ray import tune

    from slmrec.checkpoint import atomic_write_json

    if settings_file.is_file() and tune.Tuner.can_restore(experiment):
        check_same_sweep(config, settings_file)
        return
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_file, dataclasses.asdict(config))


def _concurrency(config: TuneConfig) -> int:
    import ray

    from jobs.common.tune_space import max_concurrent_trials, trial_cpus_held

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if config.max_concurrent > 0:
        held = config.max_concurrent * trial_cpus_held(config.num_workers, config.cpus_per_worker, config.trial_cpus)
        if cpus - held < config.data_cpus:
            # Only a note: an autoscaling cluster adds the CPUs as trials ask for them.
            print(f"[tune] note: {config.max_concurrent} trials at once hold {held:g} of the {cpus:g} CPUs the "
                  f"cluster has now, leaving fewer than --data-cpus {config.data_cpus:g} for Ray Data's reads; "
                  "on a cluster that does not grow, trials would wait on their data", flush=True)
        return config.max_concurrent
    print(f"[tune] sizing the sweep from the cluster as it is now ({cpus:g} CPUs, {gpus:g} GPUs); "
          "on an autoscaling cluster set --max-concurrent, which lets it grow", flush=True)
    return max_concurrent_trials(cpus, gpus, config.num_workers, config.cpus_per_worker, config.use_gpu,
                                 config.trial_cpus, config.data_cpus)


def experiment_path(storage: str, name: str) -> str:
    """Where Tune keeps the sweep's state (what `Tuner.restore` reads)."""
    return f"{storage.rstrip('/')}/{name}"


def _tuner(config: TuneConfig, trainable, storage: str, name: str, trials_dir: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from jobs.common.tune_space import search_space
    from jobs.common.tune_trial import OBJECTIVE, ReleaseStoppedTrials, trial_dirname

    experiment = experiment_path(storage, name)
    if tune.Tuner.can_restore(experiment):
        print(f"[tune] resuming sweep {experiment}", flush=True)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                  resume_errored=config.retry_errored)
    lr, weights = _ranges(config)
    concurrency = _concurrency(config)
    print(f"[tune] {config.num_samples} trials, {concurrency} at a time", flush=True)
    return tune.Tuner(
        trainable,
        param_space=search_space(config.student_layers, lr, weights, config.allow_zero_weights),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max", num_samples=config.num_samples, max_concurrent_trials=concurrency,
            search_alg=OptunaSearch(points_to_evaluate=_start_points(config) or None, seed=config.seed),
            # Trials that reach the last epoch must run their final test, so ASHA never
            # stops at max_t (stop_last_trials=False); it stops only at the rungs below.
            scheduler=ASHAScheduler(time_attr="epoch", max_t=config.epochs, grace_period=config.grace_period,
                                    reduction_factor=config.reduction_factor, stop_last_trials=False),
            trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=config.tune_max_failures),
                                  callbacks=[ReleaseStoppedTrials(str(trials_dir))]),
    )


def write_outputs(config: TuneConfig, output: Path, name: str, rows: list[dict], problem: Optional[str],
                  extra: dict) -> None:
    """Time each depth, then table, plot and (unless `problem` or no feasible trial)
    the winner; exits with the reason when there is no winner."""
    from jobs.common.tune_report import (add_driver_latency, candidates, plot_pareto, remove_winner, write_table,
                                         write_winner)
    from jobs.common.winner import NoFeasibleTrial, choose_winner, describe_rule, pareto_front

    add_driver_latency(rows, config.max_len, config.latency_batch, config.latency_threads)
    front = {c.trial_id for c in pareto_front(candidates(rows))}
    winner = None
    if problem is None:
        try:
            winner = choose_winner(candidates(rows), config.max_latency_ms, config.tolerance)
        except NoFeasibleTrial as e:
            problem = str(e)
    for row in rows:
        row["pareto"] = row["trial_id"] in front
        row["winner"] = winner is not None and row["trial_id"] == winner.trial_id
    write_table(rows, output, f"Sweep {name}: {len(rows)} trials" + (f" ({problem})" if problem else ""))
    plot_pareto(rows, front, winner.trial_id if winner else None, config.max_latency_ms, output / "pareto.png")
    if winner is None:
        remove_winner(output)
        raise SystemExit(f"[tune] no winner: {problem}")
    win_row = next(r for r in rows if r["trial_id"] == winner.trial_id)
    write_winner(output, win_row, describe_rule(config.max_latency_ms, config.tolerance), config.data, extra)
    print(f"[tune] winner {winner.trial_id}: {winner.depth} layers, valid NDCG@10 {winner.quality:.4f}, "
          f"{winner.latency_ms:.2f} ms -> {output / 'winner.json'}; table {output / 'trials.md'}", flush=True)


def run(config: TuneConfig) -> Path:
    """Run (or resume) the sweep and write its outputs; returns the output directory.
    Exits with a message when the sweep was interrupted or no trial meets the rule."""
    from jobs.common.data import load_splits
    from jobs.common.ray_runtime import init_local_ray
    from jobs.common.trainer import check_worker_gpus
    from jobs.common.tune_report import trial_row
    from jobs.common.validation_leak import refuse_validation_leak
    from jobs.common.model_spec import resolve_model_dir
    from jobs.distill import check_teacher_items
    from slmrec.checkpoint import load_meta

    output = Path(config.output).resolve()
    teacher_dir = resolve_model_dir(config.teacher)
    try:
        teacher_layers = int(load_meta(teacher_dir)["backbone_config"]["num_hidden_layers"])
    except FileNotFoundError as e:
        raise SystemExit(f"--teacher {config.teacher}: {e}; expected the output of jobs/train_teacher.py") from e
    check_config(config, teacher_layers)
    refuse_validation_leak(teacher_dir, "--teacher", validated=True)
    check_teacher_items(teacher_dir, config.data)
    name = config.name or output.name
    storage = config.storage_path or str(output / "ray")
    if "://" not in storage:
        # Absolute, as Ray Train's storage: Tune runs each trial in a folder of its own.
        storage = str(Path(storage).resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    trials_dir = output / "trials"
    record_or_check_settings(config, output / f"sweep-{name}.json", experiment_path(storage, name))

    init_local_ray()
    try:  # on the driver: a trial's own check cannot tell that this Ray is local
        check_worker_gpus(config)
    except ValueError as e:
        raise SystemExit(f"tune: {e}") from e
    from ray import tune

    from jobs.common.tune_trial import run_trial

    splits = load_splits(config.data, config.max_len, config.valid_fraction)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=_base_settings(config), teacher_dir=str(teacher_dir),
                             teacher_layers=teacher_layers, max_blocks=config.blocks, splits=splits,
                             trials_dir=str(trials_dir), latency_batch=config.latency_batch,
                             latency_threads=config.latency_threads),
        # Tune needs a non-empty bundle per trial; memory is what the driver really uses,
        # and reserving no CPU for it leaves the CPUs to the trainers and Ray Data.
        {"CPU": config.trial_cpus, "memory": config.trial_memory_gb * 2**30})
    results = _tuner(config, trainable, storage, name, trials_dir).fit()

    # Trial states as saved for a resume: after Ctrl-C, Tune's in-memory results show the
    # trials it stopped on the way out as terminated, the saved state as still to run.
    saved = {t.trial_id: t.status for t in tune.ExperimentAnalysis(results.experiment_path).trials}
    errors = {Path(r.path).name: str(r.error) for r in results if r.error}
    ended = {tid for tid, status in saved.items() if status in ("TERMINATED", "ERROR")}
    rows = [trial_row(trials_dir / tid, errors.get(tid), tid in ended) for tid in sorted(saved)]
    problem = (f"sweep {name} was interrupted ({len(ended)} of {config.num_samples} trials finished); rerun the "
               "same command to resume it") if len(ended) < config.num_samples else None
    write_outputs(config, output, name, rows, problem, {"teacher": str(teacher_dir), "sweep": name})
    return output


def main(argv: list[str] | None = None) -> None:
    config = parse_config(TuneConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "tune")
    run(config)


if __name__ == "__main__":
    main()
