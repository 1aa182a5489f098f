"""jobs/pipeline.py (what `make demo` runs) hands every stage a command line that stage's
own parser accepts, and chains the stages' outputs. The stages themselves are tested
end to end in their own files; here each stage's `main` only records its argv."""
from __future__ import annotations

from pathlib import Path

from tests.job_flags import parse_job_flags

STAGES = ("import_data", "prepare", "distill", "score")


def test_pipeline_stages_get_flags_their_parsers_accept_and_chain(ray_session, tmp_path, monkeypatch, capsys):
    import importlib

    from jobs import pipeline

    calls: dict[str, list[str]] = {}
    for stage in STAGES:
        monkeypatch.setattr(importlib.import_module(f"jobs.{stage}"), "main",
                            lambda argv, stage=stage: calls.setdefault(stage, argv))
    started: list[int | None] = []
    monkeypatch.setattr("jobs.common.ray_runtime.init_local_ray", lambda num_cpus=2: started.append(num_cpus))
    root = pipeline.run(pipeline.PipelineConfig(output=str(tmp_path / "demo"), num_cpus=3))
    monkeypatch.undo()
    assert started == [3]
    assert list(calls) == list(STAGES), "every stage runs once, in order"

    imported, prepared, distilled, scored = (parse_job_flags(stage, calls[stage]) for stage in STAGES)
    assert Path(prepared.input) == Path(imported.output) == root / "logs"
    assert Path(distilled.data) == Path(prepared.output) == Path(scored.data)
    assert Path(scored.model) == Path(distilled.output) / "best"
    defaults = pipeline.PipelineConfig()
    assert (distilled.item_epochs, distilled.item_dropout, distilled.teacher_epochs, distilled.epochs) == (
        defaults.item_epochs, defaults.item_dropout, defaults.teacher_epochs, defaults.epochs)
    assert (distilled.batch_size, distilled.lr, distilled.max_len) == (
        defaults.batch_size, defaults.lr, prepared.max_len)
    assert distilled.backbone.layers == defaults.teacher_layers
    assert distilled.student_layers == defaults.student_layers and distilled.ms_weight == 0  # one block
    assert f"python jobs/distill.py --data {distilled.data}" in capsys.readouterr().out


def test_a_rerun_skips_finished_stages_by_their_completion_files(ray_session, tmp_path, monkeypatch):
    import importlib

    from jobs import pipeline
    from pipelines.scoring import SUMMARY_FILE

    root = tmp_path / "demo"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "ml-100k.parquet").touch()
    (root / "prepared").mkdir()
    (root / "prepared" / "stats.json").touch()
    (root / "distill").mkdir()
    (root / "distill" / "REPORT.md").touch()
    (root / "scores").mkdir()  # no summary: scoring never finished
    calls: list[str] = []
    for stage in STAGES:
        monkeypatch.setattr(importlib.import_module(f"jobs.{stage}"), "main",
                            lambda argv, stage=stage: calls.append(stage))
    pipeline.run(pipeline.PipelineConfig(output=str(root)))
    assert calls == ["score"]
    (root / "scores" / SUMMARY_FILE).touch()
    pipeline.run(pipeline.PipelineConfig(output=str(root)))
    assert calls == ["score"]
