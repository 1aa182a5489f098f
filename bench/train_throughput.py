r"""Training and inference speed of the same backbone at several depths, side by side.

The paper claims the 4-layer student trains up to 6.6x and infers 8x faster than its
32-layer teacher; here the deepest model of --layers is the reference and every other
depth's speed-up is measured against it in the same process, on the same inputs.

    python bench/train_throughput.py                        # scratch, SmolLM2-135M's shape
    python bench/train_throughput.py --backbone smollm2-135m --output out/bench/smollm2
    python bench/train_throughput.py --device cuda --dtype bfloat16 --batch-size 256

Models are timed in turn, round after round (--rounds), so a change of machine load
during the run hits every depth alike; each number is the median over rounds.
Training: forward + backward + clip + AdamW at --batch-size, every position of each
sequence trained (causal); LoRA for pretrained backbones by default (--lora). Inference:
the serving path (user vectors + full-ranking top-10 over all items, history excluded)
at the same batch size. The item table is random: speed does not depend on its values.
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
import os
import statistics
from typing import Any, Literal

import torch

from slmrec.backbones import BackboneConfig
from bench.outputs import write_outputs
from slmrec.config import field, parse_config
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender
from slmrec.speed import measure_inference, measure_training


@dataclasses.dataclass
class BenchConfig:
    backbone: str = field("scratch", help="'scratch', 'smollm2-135m' or a local HF checkpoint dir")
    layers: tuple[int, ...] = field((8, 4, 2), help="depths to compare; the deepest is the reference")
    hidden: int = field(576, help="scratch: hidden size (default: SmolLM2-135M's)")
    heads: int = field(9, help="scratch: attention heads")
    kv_heads: int = field(3, help="scratch: key/value heads")
    intermediate: int = field(1536, help="scratch: MLP width")
    lora: Literal["auto", "on", "off"] = field("auto", help="LoRA: auto = on for pretrained, off for scratch")
    batch_size: int = field(16, help="sequences per training step and per inference call")
    seq_len: int = field(50, help="items per sequence")
    num_items: int = field(3706, help="catalogue size (ML-1M: 3706)")
    item_dim: int = field(128, help="item table width")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="backbone dtype")
    bf16_autocast: bool = field(False, help="also time each depth's training step under bf16 autocast (the "
                                            "jobs' --bf16-autocast), next to the plain step")
    device: Literal["cpu", "cuda"] = field("cpu", help="where to run")
    warmup: int = field(1, help="untimed iterations per model and round")
    repeats: int = field(3, help="timed iterations per model and round")
    rounds: int = field(2, help="rounds over all models (load changes hit every depth alike)")
    seed: int = field(0, help="seed of weights and inputs")
    output: str | None = field(None, help="directory for throughput.json and throughput.md")


def build(cfg: BenchConfig, layers: int, table: torch.Tensor) -> SeqRecommender:
    backbone = BackboneConfig(name=cfg.backbone, layers=layers, hidden=cfg.hidden, heads=cfg.heads,
                              kv_heads=cfg.kv_heads, intermediate=cfg.intermediate, lora=cfg.lora,
                              dtype=cfg.dtype)
    config = RecommenderConfig(num_items=cfg.num_items, item_dim=cfg.item_dim, backbone=backbone,
                               max_len=cfg.seq_len)
    return build_recommender(config, table, seed=cfg.seed).to(cfg.device)


def measure(cfg: BenchConfig) -> list[dict[str, Any]]:
    """One row per depth, deepest first, with medians over rounds and speed-ups."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    depths = sorted(set(cfg.layers), reverse=True)
    table = torch.randn(cfg.num_items + 1, cfg.item_dim, generator=torch.Generator().manual_seed(cfg.seed))
    models = {k: build(cfg, k, table) for k in depths}
    series = ["train", "infer", "step_ms", "latency_ms"] + (["train_autocast"] if cfg.bf16_autocast else [])
    runs: dict[int, dict[str, list[float]]] = {k: {name: [] for name in series} for k in depths}
    for r in range(cfg.rounds):
        for k, model in models.items():
            train = measure_training(model, seq_len=cfg.seq_len, batch_size=cfg.batch_size, warmup=cfg.warmup,
                                     repeats=cfg.repeats, device=cfg.device, seed=cfg.seed)
            infer, = measure_inference(model, seq_len=cfg.seq_len, batch_sizes=(cfg.batch_size,),
                                       warmup=cfg.warmup, repeats=cfg.repeats, device=cfg.device, seed=cfg.seed)
            if cfg.bf16_autocast:
                mixed = measure_training(model, seq_len=cfg.seq_len, batch_size=cfg.batch_size, warmup=cfg.warmup,
                                         repeats=cfg.repeats, device=cfg.device, seed=cfg.seed, bf16_autocast=True)
                runs[k]["train_autocast"].append(mixed["samples_per_s"])
            runs[k]["train"].append(train["samples_per_s"])
            runs[k]["step_ms"].append(train["step_ms_p50"])
            runs[k]["infer"].append(infer["samples_per_s"])
            runs[k]["latency_ms"].append(infer["latency_ms_p50"])
            print(f"round {r + 1}/{cfg.rounds} layers {k}: train {train['samples_per_s']:.2f} samples/s, "
                  f"inference {infer['samples_per_s']:.2f} samples/s", flush=True)
    rows = []
    for k in depths:
        counts = models[k].parameter_counts()
        med = {name: statistics.median(values) for name, values in runs[k].items()}
        rows.append({"layers": k, "params_total": counts["total"], "params_trainable": counts["trainable"],
                     "train_samples_per_s": med["train"], "train_step_ms": med["step_ms"],
                     "infer_samples_per_s": med["infer"], "infer_latency_ms": med["latency_ms"],
                     "rounds": runs[k]})
        if cfg.bf16_autocast:
            rows[-1]["train_autocast_samples_per_s"] = med["train_autocast"]
            rows[-1]["autocast_speedup"] = med["train_autocast"] / med["train"]
    deep = rows[0]
    for row in rows:
        row["train_speedup"] = row["train_samples_per_s"] / deep["train_samples_per_s"]
        row["infer_speedup"] = row["infer_samples_per_s"] / deep["infer_samples_per_s"]
    return rows


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]], load: tuple[float, float, float]) -> str:
    deep = rows[0]["layers"]
    lines = [
        f"backbone `{cfg.backbone}`, dtype {cfg.dtype}, device {cfg.device} "
        f"({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end), "
        f"torch {torch.__version__}; batch {cfg.batch_size} x {cfg.seq_len} items, {cfg.num_items} items; "
        f"median of {cfg.rounds} rounds x {cfg.repeats} timed steps",
        "",
        f"| layers | params total | trainable | train samples/s | train step ms | infer samples/s "
        f"| infer latency ms | train speed-up ({deep}/k) | infer speed-up ({deep}/k) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['params_total'] / 1e6:.1f}M | {r['params_trainable'] / 1e6:.2f}M "
                     f"| {r['train_samples_per_s']:.2f} | {r['train_step_ms']:.0f} | {r['infer_samples_per_s']:.2f} "
                     f"| {r['infer_latency_ms']:.0f} | {r['train_speedup']:.2f}x | {r['infer_speedup']:.2f}x |")
    if cfg.bf16_autocast:
        lines += ["", "| layers | train samples/s, fp32 | train samples/s, bf16 autocast | autocast speed-up |",
                  "|---|---|---|---|"]
        lines += [f"| {r['layers']} | {r['train_samples_per_s']:.2f} | {r['train_autocast_samples_per_s']:.2f} "
                  f"| {r['autocast_speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, __doc__.split("\n\n")[0], argv)
    if cfg.rounds < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise SystemExit("--rounds and --repeats must be >= 1 and --warmup >= 0")
    # Other processes share the CPUs here; the load average says how far to trust absolute numbers.
    load = os.getloadavg()
    rows = measure(cfg)
    write_outputs(cfg.output, "throughput",
                  {"config": dataclasses.asdict(cfg), "rows": rows, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "load_average_start": load[0],
                   "load_average_end": os.getloadavg()[0]},
                  markdown(cfg, rows, load))


if __name__ == "__main__":
    main()
