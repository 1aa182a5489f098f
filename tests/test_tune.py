"""The Ray Tune sweep over distillation (jobs/tune.py): search-space rules by hand, then
one tiny sweep end to end (real distillations through Ray Train V2 inside Tune trials)
in which ASHA must stop a deliberately bad trial early, and an interrupted sweep that
resumes when rerun with the same name."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from jobs.common.tune_space import (blocks_for, check_range, effective_params, max_concurrent_trials,
                                    search_space, start_point)
from jobs.common.winner import choose_winner
from jobs.tune import TuneConfig, run as run_tune
from slmrec.backbones import BackboneConfig
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender

ROOT = Path(__file__).resolve().parents[1]
RANGES = {"cos": (0.1, 10.0), "l2": (0.01, 1.0), "ms": (0.5, 0.5)}


# ---- search space, by hand ------------------------------------------------------------------

@pytest.mark.parametrize("student, expected", [(1, 1), (2, 2), (3, 1), (4, 4), (6, 2), (8, 4)])
def test_blocks_follow_depth(student, expected):
    assert blocks_for(8, student, 4) == expected


def test_blocks_capped_and_depth_checked():
    assert blocks_for(12, 6, 4) == 3
    assert blocks_for(8, 8, 1) == 1
    with pytest.raises(ValueError, match=r"student depth 9 must be in 1\.\.8"):
        blocks_for(8, 9, 4)


def test_ranges():
    assert check_range("cos", [0.1, 2], allow_zero_fixed=True) == (0.1, 2.0)
    assert check_range("cos", [0, 0], allow_zero_fixed=True) == (0.0, 0.0)
    for bad in ([0, 1], [2, 1], [1]):
        with pytest.raises(ValueError, match="--cos-range"):
            check_range("cos", bad, allow_zero_fixed=True)
    with pytest.raises(ValueError, match="--lr-range 0 0"):
        check_range("lr", [0, 0], allow_zero_fixed=False)


def test_space_has_switches_only_for_searched_weights():
    space = search_space([1, 2], (1e-4, 1e-2), RANGES, allow_zero=True)
    assert set(space) == {"student_layers", "lr", "cos_weight", "cos_on", "l2_weight", "l2_on", "ms_weight"}
    assert space["ms_weight"] == 0.5
    assert "cos_on" not in search_space([1, 2], (1e-4, 1e-2), RANGES, allow_zero=False)


def test_effective_params_switch_weights_off_and_drop_ms_without_blocks():
    sample = {"student_layers": 4, "lr": 1e-3, "cos_weight": 2.0, "cos_on": False, "l2_weight": 0.1,
              "l2_on": True, "ms_weight": 0.5}
    assert effective_params(sample, 8, 4) == {"student_layers": 4, "blocks": 4, "lr": 1e-3, "cos_weight": 0.0,
                                              "l2_weight": 0.1, "ms_weight": 0.5}
    assert effective_params({**sample, "student_layers": 3}, 8, 4)["ms_weight"] == 0.0


def test_start_point_in_space_terms():
    point = {"student_layers": 2, "lr": 1e-3, "cos_weight": 0, "l2_weight": 0.1, "ms_weight": 0.5}
    assert start_point(point, [1, 2], (1e-4, 1e-2), RANGES, allow_zero=True) == {
        "student_layers": 2, "lr": 1e-3, "cos_weight": 0.1, "cos_on": False, "l2_weight": 0.1, "l2_on": True}
    with pytest.raises(ValueError, match=r"lr 0 is outside the searched range \[0.0001, 0.01\]"):
        start_point({**point, "lr": 0}, [1, 2], (1e-4, 1e-2), RANGES, allow_zero=True)
    with pytest.raises(ValueError, match="student_layers must be one of"):
        start_point({**point, "student_layers": 3}, [1, 2], (1e-4, 1e-2), RANGES, allow_zero=True)
    with pytest.raises(ValueError, match="give exactly"):
        start_point({"lr": 1e-3}, [1, 2], (1e-4, 1e-2), RANGES, allow_zero=True)


def test_concurrency_from_resources_per_trial():
    # 2 CPUs, 1 kept for Ray Data, trials of one 0.5-CPU worker and a 0-CPU driver: 2.
    assert max_concurrent_trials(2, 0, 1, 0.5, False, 0.0, 1.0) == 2
    assert max_concurrent_trials(64, 8, 2, 4, True, 1, 4) == 4  # GPUs bound it
    assert max_concurrent_trials(64, 8, 1, 4, True, 1, 4) == 8
    assert max_concurrent_trials(1, 0, 1, 1.0, False, 0.0, 1.0) == 1  # never below one


def test_an_explicit_concurrency_that_leaves_no_cpu_for_reads_is_noted(ray_session, capsys):
    from jobs.tune import TuneConfig, _concurrency

    def concurrency(n: int) -> tuple[int, str]:
        config = TuneConfig(data="d", teacher="t", output="o", max_concurrent=n, num_workers=1,
                            cpus_per_worker=0.5, trial_cpus=0.0, data_cpus=1.0)
        return _concurrency(config), capsys.readouterr().out

    # The session's Ray has 2 CPUs: 4 trials of 0.5 hold both, 2 leave the one --data-cpus asks for.
    assert concurrency(2) == (2, "")
    n, note = concurrency(4)
    assert n == 4 and "4 trials at once hold 2 of the 2 CPUs" in note and "--data-cpus 1" in note

def test_frozen_cluster_sweep_config_is_valid():
    from jobs.tune import check_config
    from slmrec.config import parse_config

    config = parse_config(TuneConfig, "", ["--config", str(ROOT / "cluster/tune_example.yaml")])
    check_config(config, teacher_layers=8)
    assert config.student_layers == [1, 2, 3, 4, 6] and config.use_gpu
    # 8 GPUs and 64 CPUs: one single-GPU trial per GPU, set explicitly since aws.yaml's GPU
    # workers start at 0 (sized from the resources at start, the sweep would run 1 at a time).
    assert config.max_concurrent == 8
    assert max_concurrent_trials(64, 8, config.num_workers, config.cpus_per_worker, config.use_gpu,
                                 config.trial_cpus, config.data_cpus) == 8


@pytest.mark.parametrize("flags,problem", [
    (["--tolerance", "nan"], "--tolerance must be a number >= 0, got nan"),
    (["--max-latency-ms", "nan"], "--max-latency-ms must be a number > 0, got nan"),
    (["--max-concurrent", "-1"], "--max-concurrent must be >= 0, got -1"),
    (["--data-cpus", "-2"], "--data-cpus must be >= 0, got -2.0"),
    (["--trial-memory-gb", "-1"], "--trial-memory-gb must be >= 0, got -1.0"),
])
def test_sweep_refuses_settings_that_would_fail_only_after_the_sweep(flags, problem):
    from jobs.tune import check_config
    from slmrec.config import parse_config

    config = parse_config(TuneConfig, "", ["--config", str(ROOT / "cluster/tune_example.yaml"), *flags])
    with pytest.raises(SystemExit, match=problem):
        check_config(config, teacher_layers=8)


def test_latency_is_timed_on_the_merged_model_serving_runs():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from jobs.common.tune_trial import time_student
    from tests.tiny_serving import tiny_model

    student = tiny_model(lora="on")
    row = time_student(student, seq_len=8, batch_size=2, threads=1, repeats=2)
    assert row["latency_ms"] > 0 and (row["latency_batch"], row["latency_threads"]) == (2, 1)
    assert not any(isinstance(m, BaseTunerLayer) for m in student.modules())


def test_sweep_refuses_training_on_validation_targets():
    from jobs.tune import check_config
    from slmrec.config import parse_config

    config = parse_config(TuneConfig, "", ["--config", str(ROOT / "cluster/tune_example.yaml"), "--train-on-valid"])
    with pytest.raises(SystemExit, match="--train-on-valid"):
        check_config(config, teacher_layers=8)


# ---- the sweep, end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """More users than the shared tiny set, so one epoch is enough to separate a learning
    student from one that does not learn (16 steps of 16 users)."""
    from tests.prepared_data import write_prepared

    return write_prepared(tmp_path_factory.mktemp("tune_data") / "prep", users=256)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-layer scratch teacher. Untrained is enough here: the sweep's mechanics (trials,
    reports, ASHA, outputs) are under test, not the teacher's quality."""
    table = torch.randn(31, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    table[0] = 0
    config = RecommenderConfig(num_items=30, item_dim=16, max_len=12,
                               backbone=BackboneConfig(layers=2, hidden=16, heads=2))
    path = tmp_path_factory.mktemp("tune_teacher") / "best"
    build_recommender(config, table, seed=0).save(path)
    return path


def _config(prepared: Path, teacher: Path, output: Path, **overrides) -> TuneConfig:
    settings = dict(data=str(prepared), teacher=str(teacher), output=str(output), max_len=12, batch_size=16,
                    warmup_steps=1, cpus_per_worker=0.5, eval_batch_size=256, log_every=100, student_layers=[1, 2],
                    blocks=2, lr_range=(1e-6, 5e-2), cos_range=(0.1, 1.0), l2_range=(0.01, 0.1),
                    ms_range=(0.1, 1.0), epochs=3, grace_period=1, reduction_factor=2, max_concurrent=2)
    return TuneConfig(**{**settings, **overrides})


def test_fixed_sweep_settings_reach_every_trial_config(tmp_path):
    from jobs.distill import DistillConfig, loss_weights
    from jobs.tune import _base_settings
    from slmrec.config import from_dict

    config = _config(tmp_path / "data", tmp_path / "teacher", tmp_path / "out", kd_weight=0.5, kd_temperature=2.0,
                     student_init="teacher", student_finetuning="full")
    trial = from_dict(DistillConfig, {**_base_settings(config), "cos_weight": 1.0, "output": "o", "teacher": "t"},
                      "trial")
    assert loss_weights(trial)["kd"] == 0.5 and loss_weights(trial)["kd_temperature"] == 2.0
    assert trial.student_init == "teacher" and trial.student_finetuning == "full" and trial.max_len == 12


GOOD = [{"student_layers": 2, "lr": 3e-2, "cos_weight": 0.5, "l2_weight": 0, "ms_weight": 0.5},
        {"student_layers": 1, "lr": 2e-2, "cos_weight": 0, "l2_weight": 0.05, "ms_weight": 0}]
# A learning rate of 1e-6 leaves the student at its initialisation: it cannot keep up.
BAD = {"student_layers": 2, "lr": 1e-6, "cos_weight": 0.5, "l2_weight": 0, "ms_weight": 0.5}


def test_sweep_stops_bad_trial_and_hands_over_winner(ray_session, prepared, teacher, tmp_path):
    from jobs.serve import ServeConfig
    from slmrec.config import parse_config

    out = tmp_path / "sweep"
    config = _config(prepared, teacher, out, num_samples=4, start_points=[json.dumps(p) for p in (*GOOD, BAD)])
    run_tune(config)

    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 4
    by_lr = {r["lr"]: r for r in rows}
    bad = by_lr[BAD["lr"]]
    assert bad["status"] == "stopped early", "ASHA stopped the trial that does not learn"
    assert bad["epochs_run"] < config.epochs
    assert bad["epochs_run"] < max(r["epochs_run"] for r in rows)
    assert any(r["status"] == "completed" and r["epochs_run"] == config.epochs for r in rows)
    assert by_lr[GOOD[1]["lr"]]["ms_weight"] == 0 and by_lr[GOOD[1]["lr"]]["blocks"] == 1
    for r in rows:
        assert r["latency_ms"] > 0 and r["trial_latency_ms"] > 0 and r["latency_batch"] == 32
        # The driver times each depth once, so equal architectures get equal figures.
        assert r["latency_ms"] == next(o["latency_ms"] for o in rows if o["student_layers"] == r["student_layers"])
        assert r["checkpoint"] is not None, "every trial ran at least one epoch and saved its best student"
    assert (out / "trials.md").read_text().count("\n| ") == 4 + 1  # header + one line per trial
    assert (out / "pareto.png").stat().st_size > 0

    winner = json.loads((out / "winner.json").read_text())
    assert winner["test_full_masked/NDCG@10"] >= winner["test_full/NDCG@10"]
    from jobs.common.tune_report import candidates

    assert winner["trial_id"] == choose_winner(candidates(rows)).trial_id
    assert [r["trial_id"] for r in rows if r["winner"]] == [winner["trial_id"]]
    student = SeqRecommender.load(winner["model"])
    assert student.depth == winner["config"]["student_layers"]
    serve = parse_config(ServeConfig, "", ["--config", str(out / "serve.yaml")])
    assert serve.model == [f"winner={winner['model']}"] and serve.data == str(prepared)


def _fake_trial(trials: Path, trial_id: str, depth: int, valid: list[float], teacher: Path, finished: bool) -> Path:
    """A trial directory as run_trial and the worker loop leave it (the teacher stands in
    for the student checkpoint: any SeqRecommender will do for timing)."""
    import shutil

    from slmrec.checkpoint import atomic_write_json

    out = trials / trial_id
    shutil.copytree(teacher, out / "best")
    atomic_write_json(out / "trial.json", {"params": {"student_layers": depth, "blocks": 1, "lr": 1e-3,
                                                      "cos_weight": 1.0, "l2_weight": 0.0, "ms_weight": 0.0},
                                           "epochs": 2, "latency_ms": 2.0, "latency_batch": 4, "params_total": 1})
    atomic_write_json(out / "history.json", [{"epoch": i + 1, "valid/NDCG@10": v} for i, v in enumerate(valid)])
    if finished:
        atomic_write_json(out / "metrics.json", {"final": {"test_full/NDCG@10": 0.5, "test_full_masked/NDCG@10": 0.7},
                                                 "history": []})
    return out


def test_outputs_from_trial_files_and_no_feasible_winner(teacher, tmp_path):
    from jobs.common.tune_report import trial_row
    from jobs.tune import write_outputs

    out = tmp_path / "sweep"
    rows = [trial_row(_fake_trial(out / "trials", "a", 2, [0.3, 0.5], teacher, True), None, True),
            trial_row(_fake_trial(out / "trials", "b", 2, [0.1], teacher, False), None, True)]
    assert [(r["status"], r["epochs_run"], r["best_epoch"], r["valid_NDCG@10"]) for r in rows] == [
        ("completed", 2, 2, 0.5), ("stopped early", 1, 1, 0.1)]
    config = _config(tmp_path, teacher, out, latency_batch=4, max_latency_ms=1e-6)
    (out / "winner.json").write_text("{}")  # a stale winner from an earlier run must go
    with pytest.raises(SystemExit, match=r"no winner: no trial meets --max-latency-ms 1e-06: the fastest, trial a"):
        write_outputs(config, out, "sweep", rows, None, {})
    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert [r["trial_id"] for r in table] == ["a", "b"] and not any(r["winner"] for r in table)
    assert table[0]["latency_ms"] == table[1]["latency_ms"] > 0, "one timing per depth"
    assert not (out / "winner.json").exists() and (out / "pareto.png").is_file()

    # A trial that raised after saving its best validation score yet does not win.
    failed = trial_row(_fake_trial(out / "trials", "c", 2, [0.9], teacher, False), "RuntimeError: boom", True)
    assert failed["status"] == "error" and failed["checkpoint"]
    write_outputs(_config(tmp_path, teacher, out, latency_batch=4), out, "sweep", rows + [failed], None, {})
    winner = json.loads((out / "winner.json").read_text())
    assert winner["trial_id"] == "a"
    assert (winner["test_full/NDCG@10"], winner["test_full_masked/NDCG@10"]) == (0.5, 0.7)
    with pytest.raises(SystemExit, match="no winner: interrupted"):
        write_outputs(config, out, "sweep", rows, "interrupted", {})
    assert not (out / "winner.json").exists()


def test_resume_refuses_changed_settings(tmp_path):
    from dataclasses import asdict

    from jobs.tune import check_same_sweep

    config = _config(tmp_path, tmp_path / "t", tmp_path / "x", num_samples=4)
    saved = tmp_path / "sweep.json"
    saved.write_text(json.dumps(asdict(config)))
    check_same_sweep(config, saved)
    check_same_sweep(_config(tmp_path, tmp_path / "t", tmp_path / "x", num_samples=4, tolerance=0.01,
                             max_latency_ms=5.0), saved)  # only the winner rule changed: allowed
    with pytest.raises(SystemExit, match=r"num_samples: 4 -> 8.*pick a new --name"):
        check_same_sweep(_config(tmp_path, tmp_path / "t", tmp_path / "x", num_samples=8), saved)


def test_settings_are_checked_only_once_tune_has_state_to_resume(tmp_path):
    from dataclasses import asdict

    from jobs.tune import record_or_check_settings

    settings, experiment = tmp_path / "sweep-s.json", tmp_path / "ray" / "s"
    record_or_check_settings(_config(tmp_path, tmp_path / "t", tmp_path / "x", num_samples=4),
                             settings, str(experiment))
    # The first run died before Tune saved anything: a corrected rerun starts afresh.
    fixed = _config(tmp_path, tmp_path / "t", tmp_path / "x", num_samples=8)
    record_or_check_settings(fixed, settings, str(experiment))
    assert json.loads(settings.read_text()) == json.loads(json.dumps(asdict(fixed)))
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    with pytest.raises(SystemExit, match=r"num_samples: 8 -> 4"):
        record_or_check_settings(_config(tmp_path, tmp_path / "t", tmp_path / "x", num_samples=4),
                                 settings, str(experiment))


def test_bad_depth_fails_before_ray(teacher, tmp_path):
    config = _config(tmp_path, teacher, tmp_path / "x", student_layers=[1, 4])
    with pytest.raises(SystemExit, match=r"--student-layers \[4\]: must be in 1\.\.2"):
        run_tune(config)


def test_interrupted_sweep_resumes_with_same_name(ray_session, prepared, teacher, tmp_path):
    """SIGINT the sweep (a separate driver on the session's Ray) once its first trial has
    finished and the second started (one at a time, so Tune has recorded the first as
    done); rerunning with the same name completes it without rerunning the first."""
    from slmrec.config import parse_config

    out = tmp_path / "resumable"
    config = _config(prepared, teacher, out, num_samples=2, epochs=2, max_concurrent=1, name="resume-me",
                     log_every=20)
    argv = [sys.executable, str(ROOT / "jobs/tune.py"), "--data", config.data, "--teacher", config.teacher,
            "--output", config.output, "--name", "resume-me", "--num-samples", "2", "--epochs", "2",
            "--max-concurrent", "1", "--max-len", "12", "--batch-size", "16", "--warmup-steps", "1",
            "--cpus-per-worker", "0.5", "--student-layers", "1", "2", "--blocks", "2",
            "--lr-range", "1e-6", "5e-2", "--cos-range", "0.1", "1", "--l2-range", "0.01", "0.1",
            "--ms-range", "0.1", "1"]
    assert parse_config(TuneConfig, "", argv[2:]) == config
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    # Ray puts the driver's working directory on its workers' path: the repository root.
    driver = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(list(out.glob("trials/*/trial.json"))) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
    done = list(out.glob("trials/*/metrics.json"))
    assert len(done) == 1, "expected the first trial finished and the second running"
    first_done = done[0]
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) != 0, "an interrupted sweep must not report success"
    assert not (out / "winner.json").exists()
    finished_at = first_done.stat().st_mtime

    run_tune(config)
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped early") for r in rows)
    assert first_done.stat().st_mtime == finished_at, "the finished trial was not run again"
    assert (out / "winner.json").is_file()
