r"""How the serving path's shortcuts pay off: three ways to the same user states, side by side.

Ranking reads one state per user: the last item's post-norm state. Timed on the same
inputs, in turn, round after round:
- full: the plain forward over every position and layer, then the last item's state;
- last layer at the read position: every layer but the last runs everywhere, the last
  only where it is read, the prompt still run for every user (slmrec.last_state without
  a prefix);
- + prompt once: as above with the shared prompt's states and keys/values computed once
  per batch (what `SeqRecommender.user_states` does).
Each cell is the median seconds per batch over --rounds x --repeats calls, under
`torch.inference_mode`; the states of the three paths are checked equal first.

    python bench/user_state_paths.py                              # SmolLM2-135M, 8 and 2 layers
    python bench/user_state_paths.py --seq-lens 20 200 --output out/bench/user-states
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from slmrec.backbones import BackboneConfig
from slmrec.checkpoint import atomic_write_json, atomic_write_text
from slmrec.config import field, parse_config
from slmrec.last_state import decoder_last_states, supports_last_only
from slmrec.model import RecommenderConfig, SeqRecommender, build_recommender, last_indices
from slmrec.speed import synthetic_batch

PATHS = ("full", "last layer", "last layer + prompt once")


@dataclasses.dataclass
class BenchConfig:
    backbone: str = field("smollm2-135m", help="'smollm2-135m' or a local HF checkpoint dir (LLaMA "
                                               "architecture; a tokenizer gives the prompt)")
    layers: tuple[int, ...] = field((8, 2), help="depths to time")
    seq_lens: tuple[int, ...] = field((20, 50, 200), help="items per history")
    batch_size: int = field(32, help="users per call")
    num_items: int = field(3706, help="catalogue size (ML-1M: 3706)")
    threads: int = field(1, help="torch threads")
    repeats: int = field(2, help="timed calls per path and round")
    rounds: int = field(2, help="rounds over all paths (load changes hit every path alike)")
    seed: int = field(0, help="seed of weights and inputs")
    output: str | None = field(None, help="directory for user_state_paths.json and .md")


def path_functions(model: SeqRecommender) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def full(items):
        return model.last_position(model(items).hidden, items != 0)

    def prompt_per_user(items):
        index = last_indices(items != 0) + len(model.prompt_ids)
        return decoder_last_states(model.decoder, model._decoder_inputs(items), index)

    return dict(zip(PATHS, (full, prompt_per_user, model.user_states)))


def measure(cfg: BenchConfig) -> list[dict[str, Any]]:
    table = torch.randn(cfg.num_items + 1, 128, generator=torch.Generator().manual_seed(cfg.seed))
    rows = []
    for layers in cfg.layers:
        config = RecommenderConfig(num_items=cfg.num_items, item_dim=128, max_len=max(cfg.seq_lens),
                                   backbone=BackboneConfig(name=cfg.backbone, layers=layers, lora="off"))
        model = build_recommender(config, table, seed=cfg.seed).eval()
        if not supports_last_only(model.decoder):
            raise SystemExit(f"{cfg.backbone}: not a LLaMA-architecture decoder; it always takes the full forward")
        paths = path_functions(model)
        for seq_len in cfg.seq_lens:
            items, _ = synthetic_batch(cfg.num_items, cfg.batch_size, seq_len, cfg.seed)
            times: dict[str, list[float]] = {name: [] for name in PATHS}
            with torch.inference_mode():
                states = [fn(items) for fn in paths.values()]  # also the warm-up
                gap = max(float((s - states[0]).abs().max()) for s in states[1:])
                for _ in range(cfg.rounds):
                    for name, fn in paths.items():
                        for _ in range(cfg.repeats):
                            start = time.perf_counter()
                            fn(items)
                            times[name].append(time.perf_counter() - start)
            seconds = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"layers": layers, "seq_len": seq_len, "prompt_tokens": len(model.prompt_ids),
                         "max_abs_difference": gap, "seconds": seconds, "times": times,
                         "speedup_vs_full": {name: seconds["full"] / s for name, s in seconds.items()}})
            print(f"layers {layers}, {seq_len} items: " +
                  ", ".join(f"{name} {s:.3f} s" for name, s in seconds.items()), flush=True)
    return rows


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]], load: tuple[float, float]) -> str:
    lines = [f"backbone `{cfg.backbone}` ({rows[0]['prompt_tokens']} prompt tokens), batch {cfg.batch_size}, "
             f"{cfg.threads} torch thread(s), {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start "
             f"and {load[1]:.1f} at the end; median seconds per batch of {cfg.rounds} rounds x {cfg.repeats} calls",
             "", "| layers | items | " + " | ".join(f"{p}, s" for p in PATHS) + " | speed-up over full | "
             "max abs difference |", "|---|---|" + "---|" * (len(PATHS) + 2)]
    for r in rows:
        cells = " | ".join(f"{r['seconds'][p]:.3f}" for p in PATHS)
        ups = ", ".join(f"{r['speedup_vs_full'][p]:.2f}x" for p in PATHS[1:])
        lines.append(f"| {r['layers']} | {r['seq_len']} | {cells} | {ups} | {r['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, __doc__.split("\n\n")[0], argv)
    if cfg.rounds < 1 or cfg.repeats < 1:
        raise SystemExit("--rounds and --repeats must be >= 1")
    torch.set_num_threads(cfg.threads)
    start_load = os.getloadavg()[0]
    rows = measure(cfg)
    table = markdown(cfg, rows, (start_load, os.getloadavg()[0]))
    print(table)
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "user_state_paths.json", {"config": dataclasses.asdict(cfg), "rows": rows,
                                                          "torch": torch.__version__})
        atomic_write_text(out / "user_state_paths.md", table)
        print(f"wrote {out / 'user_state_paths.json'} and {out / 'user_state_paths.md'}")


if __name__ == "__main__":
    main()
