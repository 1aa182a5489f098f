"""Metrics reports of a training stage: report.json, REPORT.md and a training-curve PNG.

The worker loop writes OUTPUT/metrics.json (final test metrics + per-epoch history); this
module turns it into what a person reads. Protocol labels travel with every number.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from slmrec.checkpoint import atomic_save_figure, atomic_write_json, atomic_write_text
from slmrec.evaluation import reported_protocols
from slmrec.losses import TERM_NAMES

# Test-metric columns of the reports, each HR@k beside its NDCG@k.
METRIC_COLS = ["HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"]


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: no metrics written by the training run ({e.strerror})") from e


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def metrics_by_protocol(final: dict[str, float], prefix: str = "test_") -> list[dict[str, Any]]:
    """{'test_full/NDCG@10': x, ...} -> one row per protocol label."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in final.items():
        if key.startswith(prefix) and "/" in key:
            label, metric = key[len(prefix):].split("/", 1)
            rows.setdefault(label, {"protocol": label})[metric] = value
    return list(rows.values())


def protocol_descriptions(sampled_negatives: int, seed: int) -> dict[str, str]:
    """{label: description} of the protocols every report states next to its numbers."""
    return {p.label: p.description for p in reported_protocols(sampled_negatives, seed)}


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for key in (f"train/{term}" for term in TERM_NAMES):
        values = [h.get(key) for h in history]
        if any(v for v in values):
            ax_loss.plot(epochs, values, marker="o", label=key.split("/", 1)[1])
    ax_loss.set(xlabel="epoch", ylabel="mean training loss term", title="training loss")
    ax_loss.legend()
    valid_keys = sorted(k for k in (history[0] if history else {}) if k.startswith("valid/"))
    for key in valid_keys:
        ax_val.plot(epochs, [h[key] for h in history], marker="o", label=key.split("/", 1)[1])
    ax_val.set(xlabel="epoch", ylabel="validation metric", title="validation (full ranking)")
    if valid_keys:
        ax_val.legend()
    else:
        ax_val.text(0.5, 0.5, "not validated\n(trained on the validation targets)", ha="center", va="center",
                    transform=ax_val.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write_training_report(output_dir: str | Path, title: str, extra: dict[str, Any] | None = None,
                          sampled_negatives: int = 999) -> dict[str, Any]:
    """REPORT.md + report.json + training_curve.png from OUTPUT/metrics.json."""
    out = Path(output_dir)
    metrics = read_metrics(out)
    final, history = metrics["final"], metrics["history"]
    protocols = protocol_descriptions(sampled_negatives, metrics["spec"]["seed"])
    report = {"title": title, "final": final, "protocols": protocols, "history": history, **(extra or {})}
    atomic_write_json(out / "report.json", report)
    plot_curves(history, out / "training_curve.png", title)
    rows = metrics_by_protocol(final)
    lines = [f"# {title}", "",
             (f"Trained on the validation targets too (--train-on-valid): the last epoch, "
              f"{final['best_epoch']}, is tested." if metrics["spec"].get("train_on_valid") else
              f"Best epoch by validation NDCG@10: {final['best_epoch']}."), "",
             "## Test metrics", "", markdown_table(rows, ["protocol", *METRIC_COLS]), ""]
    lines += [f"- `{label}`: {desc}" for label, desc in protocols.items()]
    epoch_cols = ["epoch", "epoch_seconds", "train/total", "valid/NDCG@10", "valid/HR@10"]
    lines += ["", "## Per epoch", "", markdown_table(history, epoch_cols), "",
              "![training curve](training_curve.png)", ""]
    atomic_write_text(out / "REPORT.md", "\n".join(lines))
    return report
