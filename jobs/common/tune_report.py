"""The sweep's outputs: trials table (Parquet + Markdown), Pareto plot, winner files.

Rows are read from what each trial wrote under OUTPUT/trials/<id>/ (trial.json,
history.json, metrics.json, best/), not from Tune's in-memory results, so a resumed
sweep reports the whole history of a trial that ran across two driver processes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from jobs.common.report import markdown_table
from jobs.common.tune_trial import TRIAL_FILE
from jobs.common.winner import Candidate
from slmrec.checkpoint import atomic_save_figure, atomic_write_json, atomic_write_text

# Test metrics carried into the table and winner.json: full ranking with the history
# competing and excluded (slmrec.evaluation.reported_protocols).
TEST_KEYS = ("test_full/NDCG@10", "test_full_masked/NDCG@10")
COLUMNS = ["trial_id", "status", "student_layers", "blocks", "lr", "cos_weight", "l2_weight", "ms_weight",
           "epochs_run", "best_epoch", "valid_NDCG@10", "latency_ms", "trial_latency_ms", "params_total", *TEST_KEYS,
           "pareto", "winner", "checkpoint"]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def trial_row(trial_dir: Path, error: Optional[str], ended: bool) -> dict[str, Any]:
    """One table row. status: error, completed (ran every epoch and the final test),
    stopped early (Tune ended it before that: ASHA) or unfinished (`ended` False: the
    sweep was interrupted while the trial ran or waited)."""
    info = _read_json(trial_dir / TRIAL_FILE) or {}
    history = _read_json(trial_dir / "history.json") or []
    metrics = _read_json(trial_dir / "metrics.json")
    valid = [h["valid/NDCG@10"] for h in history]
    best = max(range(len(valid)), key=lambda i: (valid[i], -i)) if valid else None
    status = ("error" if error else "completed" if metrics else "stopped early" if ended else "unfinished")
    checkpoint = trial_dir / "best"
    row: dict[str, Any] = {
        "trial_id": trial_dir.name, "status": status, **info.get("params", {}),
        "epochs_run": len(history), "epochs": info.get("epochs"),
        "best_epoch": history[best]["epoch"] if best is not None else None,
        "valid_NDCG@10": valid[best] if best is not None else math.nan,
        "latency_ms": math.nan, "latency_ms_p99": math.nan,  # filled by add_driver_latency
        "trial_latency_ms": info.get("latency_ms", math.nan), "latency_batch": info.get("latency_batch"),
        "params_total": info.get("params_total"),
        **{key: (metrics or {}).get("final", {}).get(key, math.nan) for key in TEST_KEYS},
        "checkpoint": str(checkpoint) if (checkpoint / "meta.json").is_file() else None,
        "error": error,
    }
    return row


def add_driver_latency(rows: list[dict[str, Any]], seq_len: int, batch_size: int,
                       threads: int) -> dict[int, dict[str, Any]]:
    """Time one student per depth, one after the other in this process, and give every
    trial of that depth the figure. Latency is a property of the architecture (aux heads
    are not used in serving); timing each depth once, alone, keeps the comparison
    between depths free of the load of trials that happened to run alongside."""
    from jobs.common.tune_trial import time_student
    from slmrec.model import SeqRecommender

    timed: dict[int, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        depth = row.get("student_layers")
        if row["checkpoint"] and depth not in timed:
            timed[depth] = time_student(SeqRecommender.load(row["checkpoint"]).eval(), seq_len, batch_size,
                                        threads, repeats=20)
    for row in rows:
        row.update(timed.get(row.get("student_layers"), {}))
    return timed


def candidates(rows: Iterable[dict[str, Any]]) -> list[Candidate]:
    return [Candidate(r["trial_id"], int(r.get("student_layers") or 0), float(r["valid_NDCG@10"]),
                      float(r["latency_ms"]), r["checkpoint"], failed=r["status"] == "error") for r in rows]


def write_table(rows: list[dict[str, Any]], output: Path, title: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: (-_finite(r["valid_NDCG@10"]), r["trial_id"]))
    tmp = output / "trials.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(output / "trials.parquet")
    atomic_write_text(output / "trials.md", f"# {title}\n\n" + markdown_table(rows, COLUMNS) + "\n")


def _finite(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else -math.inf


def plot_pareto(rows: list[dict[str, Any]], front_ids: set[str], winner_id: Optional[str],
                max_latency_ms: Optional[float], path: Path) -> None:
    """Validation NDCG@10 against latency, one point per trial labelled with its depth;
    the Pareto front joined by a line, the winner circled, the latency bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if math.isfinite(_finite(r["valid_NDCG@10"])) and math.isfinite(_finite(r["latency_ms"]))]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in points:
        stopped = r["status"] != "completed"
        ax.scatter(r["latency_ms"], r["valid_NDCG@10"], marker="x" if stopped else "o",
                   color="tab:gray" if stopped else "tab:blue")
        ax.annotate(f"L{r['student_layers']}", (r["latency_ms"], r["valid_NDCG@10"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    front = sorted((r for r in points if r["trial_id"] in front_ids), key=lambda r: r["latency_ms"])
    if front:
        ax.plot([r["latency_ms"] for r in front], [r["valid_NDCG@10"] for r in front], color="tab:orange",
                marker="s", markersize=9, fillstyle="none", label="Pareto front")
    for r in points:
        if r["trial_id"] == winner_id:
            ax.scatter(r["latency_ms"], r["valid_NDCG@10"], s=220, facecolors="none", edgecolors="tab:red",
                       label="winner")
    if max_latency_ms is not None:
        ax.axvline(max_latency_ms, color="tab:red", linestyle="--", linewidth=1, label="max latency")
    batch = next((r["latency_batch"] for r in points if r.get("latency_batch")), "?")
    ax.set(xlabel=f"inference latency p50 (ms, batch {batch})", ylabel="best validation NDCG@10",
           title="Students: quality vs latency (L = layers; x = stopped early)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write_winner(output: Path, row: dict[str, Any], rule: str, data: str, extra: dict[str, Any]) -> None:
    """winner.json (settings, scores, checkpoint) and serve.yaml, which
    `python jobs/serve.py --config OUTPUT/serve.yaml` takes as-is."""
    import yaml

    atomic_write_json(output / "winner.json", {
        "model": row["checkpoint"], "rule": rule, "trial_id": row["trial_id"],
        "config": {k: row.get(k) for k in ("student_layers", "blocks", "lr", "cos_weight", "l2_weight", "ms_weight")},
        "valid_NDCG@10": row["valid_NDCG@10"], "latency_ms": row["latency_ms"], "latency_batch": row["latency_batch"],
        "trial_latency_ms": row["trial_latency_ms"],
        **{key: row[key] for key in TEST_KEYS}, "status": row["status"], **extra})
    # Absolute, as the model path: the file is used from any folder.
    serve = {"model": [f"winner={row['checkpoint']}"], "data": str(Path(data).resolve())}
    atomic_write_text(output / "serve.yaml", yaml.safe_dump(serve))


def remove_winner(output: Path) -> None:
    """A sweep without a winner must not leave a previous winner behind."""
    for name in ("winner.json", "serve.yaml"):
        (output / name).unlink(missing_ok=True)
