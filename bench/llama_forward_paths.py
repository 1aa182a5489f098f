r"""What the LLaMA path's shortcuts buy (slmrec.llama_forward), side by side on the same inputs.

Inference (ranking reads one state per user: the last item's post-norm state), LoRA merged
as served:
- full: transformers' forward over every position and layer, the prompt run for every
  user, then the last item's state;
- last layer at the read position: every layer but the last runs everywhere, the last
  only where it is read, the prompt still run for every user;
- + prompt once: as above with the shared prompt's states and keys/values computed once
  per batch (`SeqRecommender.user_states`).
Training (every position scored, full-softmax cross-entropy, backward, AdamW step; LoRA as
the backbone's default, or --lora-r/--lora-targets):
- full: transformers' forward, the prompt run for every user (`SeqRecommender.hf_forward`);
- prompt once: `SeqRecommender.forward`.
Paths are timed in turn, round after round; each cell is the median seconds per batch.
Every path's states are checked equal to the full forward's first.

    python bench/llama_forward_paths.py                              # SmolLM2-135M, 8 and 2 layers
    python bench/llama_forward_paths.py --seq-lens 20 200 --output out/bench/llama-forward
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from slmrec.backbones import BackboneConfig, merge_lora
from bench.outputs import write_outputs
from slmrec.config import field, parse_config
from slmrec.llama_forward import decoder_states, supported
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender, last_indices
from slmrec.speed import synthetic_batch

INFER = ("full", "last layer", "last layer + prompt once")
TRAIN = ("full", "prompt once")


@dataclasses.dataclass
class BenchConfig:
    backbone: str = field("smollm2-135m", help="'smollm2-135m' or a local HF checkpoint dir (LLaMA "
                                               "architecture; a tokenizer gives the prompt)")
    layers: tuple[int, ...] = field((8, 2), help="depths to time")
    seq_lens: tuple[int, ...] = field((20, 50, 200), help="items per history")
    batch_size: int = field(32, help="users per inference call")
    train_batch_size: int = field(16, help="users per training step")
    lora_r: int = field(16, help="LoRA rank while training")
    lora_targets: tuple[str, ...] = field(("gate_proj", "up_proj", "down_proj"), help="LoRA targets while training")
    num_items: int = field(3706, help="catalogue size (ML-1M: 3706)")
    threads: int = field(1, help="torch threads")
    repeats: int = field(2, help="timed calls per path and round")
    rounds: int = field(2, help="rounds over all paths (load changes hit every path alike)")
    seed: int = field(0, help="seed of weights and inputs")
    output: str | None = field(None, help="directory for llama_forward_paths.json and .md")


def inference_paths(model: SeqRecommender) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def full(items):
        return model.last_position(model.hf_forward(items).hidden, items != 0)

    def prompt_per_user(items):
        index = last_indices(items != 0) + len(model.prompt_ids)
        return decoder_states(model.decoder, model._decoder_inputs(items), read_at=index)[0]

    return dict(zip(INFER, (full, prompt_per_user, model.user_states)))


def training_paths(model: SeqRecommender, optimizer: torch.optim.Optimizer
                   ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    def step(forward):
        def run(items, targets):
            logits = model.item_logits(forward(items).hidden)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten() - 1).backward()
            optimizer.step()
            optimizer.zero_grad()
        return run

    return dict(zip(TRAIN, (step(model.hf_forward), step(model.forward))))


def _median_times(paths: dict[str, Callable], args: tuple, cfg: BenchConfig) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(cfg.rounds):
        for name, fn in paths.items():
            for _ in range(cfg.repeats):
                start = time.perf_counter()
                fn(*args)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(cfg: BenchConfig) -> list[dict[str, Any]]:
    table = torch.randn(cfg.num_items + 1, 128, generator=torch.Generator().manual_seed(cfg.seed))
    rows = []
    for layers in cfg.layers:
        backbone = BackboneConfig(name=cfg.backbone, layers=layers, lora_r=cfg.lora_r, lora_alpha=cfg.lora_r,
                                  lora_targets=cfg.lora_targets)
        config = RecommenderConfig(num_items=cfg.num_items, item_dim=128, max_len=max(cfg.seq_lens), backbone=backbone)
        model = build_recommender(config, table, seed=cfg.seed)
        if not supported(model.decoder):
            raise SystemExit(f"{cfg.backbone}: not a LLaMA-architecture decoder; it always takes transformers' forward")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        train_seconds = {}
        for seq_len in cfg.seq_lens:
            items, targets = synthetic_batch(cfg.num_items, cfg.train_batch_size, seq_len, cfg.seed)
            paths = training_paths(model.train(), optimizer)
            for fn in paths.values():
                fn(items, targets)  # warm-up
            train_seconds[seq_len] = _median_times(paths, (items, targets), cfg)
        merge_lora(model)
        model.eval()
        paths = inference_paths(model)
        for seq_len in cfg.seq_lens:
            items, _ = synthetic_batch(cfg.num_items, cfg.batch_size, seq_len, cfg.seed)
            with torch.inference_mode():
                states = [fn(items) for fn in paths.values()]  # also the warm-up
                gap = max(float((s - states[0]).abs().max()) for s in states[1:])
                infer = _median_times(paths, (items,), cfg)
            rows.append({"layers": layers, "seq_len": seq_len, "prompt_tokens": len(model.prompt_ids),
                         "max_abs_difference": gap, "infer_seconds": infer, "train_seconds": train_seconds[seq_len]})
            print(f"layers {layers}, {seq_len} items: inference " +
                  ", ".join(f"{n} {s:.3f} s" for n, s in infer.items()) + "; training " +
                  ", ".join(f"{n} {s:.3f} s" for n, s in train_seconds[seq_len].items()), flush=True)
    return rows


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]], load: tuple[float, float]) -> str:
    lines = [f"backbone `{cfg.backbone}` ({rows[0]['prompt_tokens']} prompt tokens), {cfg.threads} torch "
             f"thread(s), {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start and {load[1]:.1f} at "
             f"the end; median seconds per batch of {cfg.rounds} rounds x {cfg.repeats} calls; inference batch "
             f"{cfg.batch_size} (LoRA merged), training batch {cfg.train_batch_size} (LoRA r={cfg.lora_r} on "
             f"{', '.join(cfg.lora_targets)})",
             "", "| layers | items | " + " | ".join(f"inference: {p}" for p in INFER)
             + " | " + " | ".join(f"training: {p}" for p in TRAIN) + " | max abs difference |",
             "|---|---|" + "---|" * (len(INFER) + len(TRAIN) + 1)]
    for r in rows:
        full = r["infer_seconds"]["full"]
        infer = " | ".join(f"{r['infer_seconds'][p]:.3f}" + ("" if p == "full" else f" ({full / r['infer_seconds'][p]:.2f}x)")
                           for p in INFER)
        full = r["train_seconds"]["full"]
        train = " | ".join(f"{r['train_seconds'][p]:.3f}" + ("" if p == "full" else f" ({full / r['train_seconds'][p]:.2f}x)")
                           for p in TRAIN)
        lines.append(f"| {r['layers']} | {r['seq_len']} | {infer} | {train} | {r['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, __doc__.split("\n\n")[0], argv)
    if cfg.rounds < 1 or cfg.repeats < 1:
        raise SystemExit("--rounds and --repeats must be >= 1")
    torch.set_num_threads(cfg.threads)
    start_load = os.getloadavg()[0]
    rows = measure(cfg)
    write_outputs(cfg.output, "llama_forward_paths",
                  {"config": dataclasses.asdict(cfg), "rows": rows, "torch": torch.__version__},
                  markdown(cfg, rows, (start_load, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
