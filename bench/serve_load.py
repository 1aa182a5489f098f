r"""Serving throughput and latency: Ray Serve over HTTP next to the same model in-process.

    python bench/serve_load.py                                   # synthetic student
    python bench/serve_load.py --model out/distill --data out/ml-1m
    python bench/serve_load.py --batch-sizes 1 8 64 --clients 4 --requests 40

For each model variant (fp32 and its int8 copy) and each batch size B (users per call):
  - Serve: `clients` threads run a closed loop on 127.0.0.1 (send a call of B user
    histories to POST /recommend, wait for the answer, send the next), `requests` calls
    each after `warmup` calls; one replica with `cpus` CPUs and as many torch threads.
  - in-process: the same model object class, loaded the same way, called on the same
    batches in a closed loop by one caller with the same number of torch threads.
Both sides run `rounds` times, alternating, on fresh random histories each round.
Reported: median users/s over rounds, p50/p99 latency per call over all rounds, the
serve/in-process throughput ratio (median of the per-round ratios), and int8/fp32
speed-ups. The load is bounded (a fixed
number of calls), so a run always ends.

Without --model/--data a student of the given shape is built with random weights and a
synthetic prepared directory (uniform random histories) is written to a temporary
directory: speed does not depend on what the weights learned.
"""
from __future__ import annotations

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.common.model_spec import resolve_model_dir
from pipelines.catalog import ItemCatalog
from slmrec.backbones import BackboneConfig
from slmrec.model import RecommenderConfig, build_recommender
from slmrec.quantize import int8_parity
from slmrec.recommend import Recommender


def synthetic_setup(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A random student checkpoint and a prepared directory with `args.items` items."""
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((args.items + 1, args.item_dim)).astype(np.float32))
    table[0] = 0
    config = RecommenderConfig(
        num_items=args.items, item_dim=args.item_dim, max_len=args.max_len,
        backbone=BackboneConfig(name="scratch", layers=args.layers, hidden=args.hidden,
                                heads=args.heads))
    build_recommender(config, table).save(root / "model")
    prepared = root / "prepared"
    (prepared / "sequences").mkdir(parents=True)
    (prepared / "items").mkdir()
    histories = [rng.integers(1, args.items + 1, args.max_len + 2).tolist() for _ in range(1000)]
    pq.write_table(pa.table({
        "user_id": pa.array(range(len(histories)), pa.int64()),
        "item_index": pa.array(histories, pa.list_(pa.int32())),
        "timestamp": pa.array([list(range(len(h))) for h in histories], pa.list_(pa.int64())),
    }), prepared / "sequences" / "part-0.parquet")
    counts = np.bincount(np.concatenate(histories), minlength=args.items + 1)[1:]
    pq.write_table(pa.table({
        "item_id": pa.array(np.arange(1, args.items + 1) * 10, pa.int64()),
        "item_index": pa.array(np.arange(1, args.items + 1), pa.int32()),
        "count": pa.array(counts, pa.int64()),
    }), prepared / "items" / "part-0.parquet")
    (prepared / "stats.json").write_text(json.dumps({"items": args.items, "users": len(histories)}))
    return root / "model", prepared


def request_batches(catalog: ItemCatalog, batch: int, count: int, length: int,
                    seed: int) -> list[list[list[int]]]:
    """`count` calls of `batch` histories (item indices) of `length` random items."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(1, catalog.num_items + 1, length).tolist() for _ in range(batch)]
            for _ in range(count)]


def summarise(rounds: list[tuple[list[float], int, float]]) -> dict[str, float]:
    """Median throughput over rounds (each: call latencies, users, wall seconds) and
    latency percentiles over all calls of all rounds."""
    ordered = sorted(t for latencies, _, _ in rounds for t in latencies)
    return {"users_per_s": statistics.median(users / wall for _, users, wall in rounds),
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def run_in_process(recommender: Recommender, batches, warmup: int,
                   k: int) -> tuple[list[float], int, float]:
    for histories in batches[:warmup]:
        recommender(histories, k, True)
    latencies = []
    start = time.perf_counter()
    for histories in batches[warmup:]:
        t = time.perf_counter()
        recommender(histories, k, True)
        latencies.append(time.perf_counter() - t)
    return latencies, sum(len(b) for b in batches[warmup:]), time.perf_counter() - start


def run_serve(url: str, model_id: str, catalog: ItemCatalog, per_client, warmup: int,
              k: int) -> tuple[list[float], int, float]:
    """Each client thread sends its own list of calls in a closed loop."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(per_client) + 1)

    def client(batches) -> None:
        bodies = [{"requests": [{"history": catalog.ids_of(np.asarray(h)).to_pylist()}
                                for h in histories], "k": k, "model": model_id}
                  for histories in batches]
        with httpx.Client(base_url=url, timeout=120) as http:
            for body in bodies[:warmup]:
                http.post("/recommend", json=body).raise_for_status()
            barrier.wait()
            mine = []
            for body in bodies[warmup:]:
                t = time.perf_counter()
                response = http.post("/recommend", json=body)
                mine.append(time.perf_counter() - t)
                if response.status_code != 200:
                    with lock:
                        errors.append(response.text[:200])
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(b,)) for b in per_client]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed calls, first: {errors[0]}")
    return latencies, sum(len(b) for c in per_client for b in c[warmup:]), wall


def parity_on_test_split(data: Path, local: dict[str, Recommender], users: int) -> dict:
    """int8 vs fp32 on the leave-one-out test split of the first `users` users: history
    = all but the last item, target = the last item (meaningful for a trained --model;
    with the synthetic random model only the overlap says something)."""
    sequences = pq.read_table(data / "sequences", columns=["item_index"]).column(
        "item_index").to_pylist()[:users]
    histories = [s[:-1] for s in sequences if len(s) >= 2]
    targets = [s[-1] for s in sequences if len(s) >= 2]
    return int8_parity(local["fp32"].model, local["int8"].model, histories, targets, k=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="student checkpoint (default: a synthetic one)")
    parser.add_argument("--data", help="prepared directory matching --model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients")
    parser.add_argument("--requests", type=int, default=10, help="timed calls per client and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating in-process/Serve rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per client first")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--history", type=int, default=50, help="items per request history")
    parser.add_argument("--cpus", type=int, default=1, help="replica CPUs = torch threads")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--items", type=int, default=3706, help="synthetic: items (ML-1M has 3706)")
    parser.add_argument("--item-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--parity-users", type=int, default=512,
                        help="users of the test split for the int8 parity report")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    if (args.model is None) != (args.data is None):
        parser.error("give both --model and --data, or neither (synthetic)")

    from ray import serve

    from jobs.common.ray_runtime import init_local_ray
    from jobs.serve import build_app

    load_at_start = os.getloadavg()
    tmp = tempfile.TemporaryDirectory()
    model_path, data = ((resolve_model_dir(args.model), Path(args.data)) if args.model
                        else synthetic_setup(Path(tmp.name), args))
    catalog = ItemCatalog.from_prepared(data)
    torch.set_num_threads(args.cpus)
    local = {"fp32": Recommender.load(model_path), "int8": Recommender.load(model_path, int8=True)}
    parity = parity_on_test_split(Path(data), local, args.parity_users)
    print(json.dumps({"int8_parity": parity}), flush=True)

    init_local_ray(num_cpus=max(2, args.cpus + 1))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({
        "model": [f"m={model_path}"], "data": str(data), "quantize": "both",
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "max_requests": max(args.batch_sizes), "max_history": args.history,
        "cpus_per_replica": float(args.cpus)}), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    rows = []
    try:
        for variant, model_id in (("fp32", "m"), ("int8", "m-int8")):
            for batch in args.batch_sizes:
                calls = args.warmup + args.requests
                served_rounds, inproc_rounds = [], []
                # Alternate the two sides round by round, so a change in the machine's
                # load hits both and the ratio stays meaningful.
                for r in range(args.rounds):
                    per_client = [request_batches(catalog, batch, calls, args.history,
                                                  seed=1000 * r + c)
                                  for c in range(args.clients)]
                    # In-process gets every client's calls, one after the other.
                    inproc_batches = (per_client[0][:args.warmup]
                                      + [b for c in per_client for b in c[args.warmup:]])
                    inproc_rounds.append(run_in_process(local[variant], inproc_batches,
                                                        args.warmup, args.k))
                    served_rounds.append(run_serve(url, model_id, catalog, per_client,
                                                   args.warmup, args.k))
                served, inproc = summarise(served_rounds), summarise(inproc_rounds)
                row = {"model": variant, "batch": batch, "clients": args.clients,
                       "rounds": args.rounds,
                       **{f"serve_{k}": round(v, 2) for k, v in served.items()},
                       **{f"inproc_{k}": round(v, 2) for k, v in inproc.items()},
                       # Per-round ratios: each compares two runs made back to back.
                       "ratio": round(statistics.median(
                           (s[1] / s[2]) / (i[1] / i[2])
                           for s, i in zip(served_rounds, inproc_rounds)), 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        tmp.cleanup()

    print_table(rows)
    # Other work on the machine moves these numbers; the load average says how much.
    load = {"load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    print(json.dumps(load))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"settings": vars(args), **load, "int8_parity": parity, "rows": rows}, indent=2))


def print_table(rows: list[dict]) -> None:
    print("\n| model | batch | serve users/s | serve p50 ms | serve p99 ms | in-process users/s "
          "| in-process p50 ms | in-process p99 ms | serve / in-process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['serve_users_per_s']} | {r['serve_p50_ms']} "
              f"| {r['serve_p99_ms']} | {r['inproc_users_per_s']} | {r['inproc_p50_ms']} "
              f"| {r['inproc_p99_ms']} | {r['ratio']} |")
    fp32 = {r["batch"]: r for r in rows if r["model"] == "fp32"}
    for r in rows:
        if r["model"] == "int8" and r["batch"] in fp32:
            base = fp32[r["batch"]]
            print(f"int8 / fp32 users/s at batch {r['batch']}: in-process "
                  f"{r['inproc_users_per_s'] / base['inproc_users_per_s']:.2f}x, serve "
                  f"{r['serve_users_per_s'] / base['serve_users_per_s']:.2f}x")


if __name__ == "__main__":
    main()
