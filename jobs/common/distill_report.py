"""The distillation report: teacher vs student, side by side, with the protocol of every
number. REPORT.md + report.json + PNGs (loss terms per step, validation per epoch, the
layer-redundancy probe).

Speed and the probe run on the driver on a bounded sample of users, so the report costs
the same whatever the size of the data.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from jobs.common.report import (METRIC_COLS, markdown_table, metrics_by_protocol, plot_curves,
                                protocol_descriptions, read_metrics)
from jobs.distill import loss_weights
from slmrec.backbones import merge_lora
from slmrec.bucketing import length_buckets
from slmrec.checkpoint import atomic_save_figure, atomic_write_json, atomic_write_text
from slmrec.losses import TERM_NAMES
from slmrec.model import SeqRecommender, build_recommender

SPEED_BATCHES = (1, 32, 256)


def _plot_steps(steps: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [t for t in TERM_NAMES if any(s.get(t) for s in steps)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3), squeeze=False)
    for ax, term in zip(axes[0], terms):
        ax.plot([s["step"] for s in steps], [s[term] for s in steps])
        ax.set(title=term, xlabel="step")
    fig.suptitle("student loss terms (unweighted)")
    fig.tight_layout()
    atomic_save_figure(fig, path)


def _sample_batches(dataset, users: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The first `users` rows in batches of similar history length (padding trimmed)."""
    rows = dataset.take_batch(users, batch_format="numpy")
    n = len(rows["items"])
    batches = [{k: torch.tensor(v[i:i + batch]) for k, v in rows.items()} for i in range(0, n, batch)]
    return list(length_buckets(batches, window=len(batches), seed=seed))


def full_backbone_of(teacher: SeqRecommender) -> SeqRecommender | None:
    """The whole pretrained backbone (every layer, frozen, no adapters) reading items through
    the teacher's trained input projection, or None when the teacher keeps every layer.
    Probing it asks the paper's question of the untruncated LLM without fine-tuning all
    of its layers (not affordable on a CPU)."""
    if teacher.full_depth == teacher.depth:
        return None
    backbone = dataclasses.replace(teacher.config.backbone, layers=None, lora="off")
    config = dataclasses.replace(teacher.config, backbone=backbone, aux_heads=0)
    model = build_recommender(config, teacher.item_table.detach().clone())
    model.input_proj.load_state_dict(teacher.input_proj.state_dict())
    return model.eval()


def _probe(teacher: SeqRecommender, splits, seed: int, output: Path, users: int,
           full_backbone: bool, autocast: bool) -> dict[str, Any]:
    from slmrec.probe import plot_probe, probe_layers

    train = _sample_batches(splits.train, users, 64, seed)
    valid = _sample_batches(splits.valid, users, 256, seed)
    results = {f"teacher ({teacher.depth} layers)": probe_layers(teacher, train, valid, seed=seed, autocast=autocast)}
    whole = full_backbone_of(teacher) if full_backbone else None
    if whole is not None:
        label = f"full backbone ({whole.depth} layers, frozen, no adapters)"
        results[label] = probe_layers(whole, train, valid, seed=seed, autocast=autocast)
    plot_probe(results, output / "layer_probe.png")
    return results


def probe_caption(config) -> str:
    """What the probe's numbers rest on. Under --train-on-valid the models trained on the
    validation targets the probe scores, so its levels are optimistic; the comparison
    between layers is what it is for."""
    caption = (f"{config.probe_users} users; frozen forwards in "
               f"{'bf16 autocast' if config.bf16_autocast else 'fp32'}, readouts fp32.")
    if config.train_on_valid:
        caption += (" The models were trained on these validation targets (--train-on-valid): compare the "
                    "layers with each other, not these levels with held-out results.")
    return caption


def teacher_setup_differences(teacher_metrics: dict[str, Any] | None, teacher_max_len: int,
                              student_metrics: dict[str, Any], student_max_len: int) -> list[str]:
    """How the teacher's test numbers (from its own run) were measured differently from the
    student's; empty when the two rows compare like with like."""
    if teacher_metrics is None:
        return []
    teacher, student = teacher_metrics.get("spec", {}), student_metrics.get("spec", {})
    settings = [("sequence length", teacher_max_len, student_max_len)]
    settings += [(name, teacher.get(key), student.get(key)) for name, key in (
        ("seed (the sampled protocol's negatives)", "seed"), ("sampled negatives", "sampled_negatives"),
        ("validation targets trained on", "train_on_valid"))]
    return [f"{name}: teacher {t}, student {s}" for name, t, s in settings if t != s]


def write_distill_report(config, output: Path, teacher_dir: Path) -> dict[str, Any]:
    from jobs.common.data import load_splits
    from slmrec.speed import measure_inference

    student_metrics = read_metrics(output)
    teacher_metrics_path = teacher_dir.parent / "metrics.json"
    teacher_metrics = json.loads(teacher_metrics_path.read_text()) if teacher_metrics_path.is_file() else None
    teacher = SeqRecommender.load(teacher_dir).eval()
    student = SeqRecommender.load(output / "best").eval()

    models = {"teacher": teacher, "student": student}
    params = {name: m.parameter_counts() for name, m in models.items()}
    for m in models.values():
        merge_lora(m)  # timed as served (slmrec.recommend.Recommender.load merges too)
    # Teacher and student take turns per batch size, so a slow spell on a shared machine
    # lands on both sides of a speed-up rather than on one model's whole series.
    speed: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for batch_size in SPEED_BATCHES:
        for name, m in models.items():
            speed[name] += measure_inference(m, m.config.num_items, config.max_len, batch_sizes=[batch_size])
    metrics_rows = []
    for name, metrics in (("teacher", teacher_metrics), ("student", student_metrics)):
        for row in metrics_by_protocol(metrics["final"]) if metrics else []:
            metrics_rows.append({"model": name, **row})
    differences = teacher_setup_differences(teacher_metrics, teacher.config.max_len, student_metrics,
                                            student.config.max_len)
    epoch_seconds = {name: [h["epoch_seconds"] for h in m["history"]]
                     for name, m in (("teacher", teacher_metrics), ("student", student_metrics)) if m}

    probe = None
    if config.probe:
        splits = load_splits(config.data, config.max_len, config.valid_fraction)
        probe = _probe(teacher, splits, config.seed, output, config.probe_users, config.probe_full_backbone,
                       config.bf16_autocast)

    _plot_steps(student_metrics.get("steps", []), output / "loss_terms.png")
    plot_curves(student_metrics["history"], output / "training_curve.png", "student")
    protocols = protocol_descriptions(config.sampled_negatives, config.seed)
    weights = {**loss_weights(config), "blocks": config.blocks, "student_init": config.student_init,
               "student_finetuning": config.student_finetuning}
    report = {"teacher_dir": str(teacher_dir), "student_dir": str(output / "best"), "parameters": params,
              "metrics": metrics_rows, "teacher_setup_differences": differences, "protocols": protocols,
              "epoch_seconds": epoch_seconds,
              "inference": speed, "probe": probe, "distillation": weights,
              "student_final": student_metrics["final"], "history": student_metrics["history"]}
    atomic_write_json(output / "report.json", report)

    speed_rows = []
    for bs_index, bs in enumerate(SPEED_BATCHES):
        t, s = speed["teacher"][bs_index], speed["student"][bs_index]
        speed_rows.append({"batch": bs, "teacher samples/s": t["samples_per_s"],
                           "student samples/s": s["samples_per_s"],
                           "speed-up": s["samples_per_s"] / t["samples_per_s"],
                           "teacher p50 ms": t["latency_ms_p50"], "student p50 ms": s["latency_ms_p50"]})
    lines = [f"# Distillation: {teacher.depth}-layer teacher -> {student.depth}-layer student", "",
             f"Losses: CE + {config.cos_weight} x (1 - cos) + {config.l2_weight} x {config.norm_mode} over "
             f"{config.blocks} blocks + {config.ms_weight} x multiple supervision"
             + (f" + {config.kd_weight} x logit distillation (T = {config.kd_temperature}; not in the paper)"
                if config.kd_weight else "")
             + f"; student init: {config.student_init}; student backbone fine-tuning: "
             f"{config.student_finetuning}.", "",
             "## Parameters", "",
             markdown_table([{"model": n, **c} for n, c in params.items()],
                            ["model", "total", "trainable", "item_table", "token_embeddings"]), "",
             f"Student / teacher total parameters: {params['student']['total'] / params['teacher']['total']:.3f}.",
             "", "## Test metrics", "", markdown_table(metrics_rows, ["model", "protocol", *METRIC_COLS]), ""]
    lines += [f"- `{label}`: {desc}" for label, desc in protocols.items()]
    if differences:
        lines += ["", f"The teacher's rows come from its own run ({teacher_metrics_path}), measured differently:"]
        lines += [f"- {d}" for d in differences]
    lines += ["", "## Training time per epoch (s)", ""]
    lines += [f"- {name}: {', '.join(f'{s:.1f}' for s in secs)}" for name, secs in epoch_seconds.items()]
    lines += ["", f"## Inference (this machine, {next(teacher.parameters()).device}, sequence length "
                  f"{config.max_len}, full ranking)", "",
              markdown_table(speed_rows, list(speed_rows[0])), "",
              "## Loss terms", "", "![loss terms](loss_terms.png)", "", "![training curve](training_curve.png)", ""]
    if probe:
        lines += ["## Layer-redundancy probe (validation NDCG@10 of a linear readout per layer)", "",
                  probe_caption(config), ""]
        for label, rows in probe.items():
            lines += [f"{label}:", "", markdown_table(rows, ["layer", "source_layer", "NDCG@10", "HR@10"]), ""]
        lines += ["![layer probe](layer_probe.png)", ""]
    atomic_write_text(output / "REPORT.md", "\n".join(lines))
    return report
