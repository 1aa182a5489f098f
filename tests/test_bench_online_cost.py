"""bench/teacher_online_cost.py: the steps take turns, warm-up excluded, and the precomputed
step reads the teacher's outputs instead of running it."""
from __future__ import annotations

from bench.teacher_online_cost import _interleaved_medians, main


def test_steps_take_turns_and_the_first_round_is_not_counted():
    calls: list[str] = []
    medians = _interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
    assert calls == ["a", "b"] * 3 and set(medians) == {"a", "b"}


def test_a_tiny_run_reports_every_field(tmp_path):
    result = main(["--hidden", "16", "--heads", "2", "--kv-heads", "1", "--teacher-layers", "4",
                   "--student-layers", "2", "--blocks", "2", "--seq-len", "6", "--batch-size", "3",
                   "--num-items", "20", "--repeats", "1", "--output", str(tmp_path / "cost.json")])
    assert all(result[k] > 0 for k in ("teacher_forward_s", "precomputed_step_s", "online_step_s"))
    assert result["saved_by_precomputing"] < 1 and (tmp_path / "cost.json").is_file()
