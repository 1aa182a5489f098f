r"""The prepare stage on Ray (jobs/prepare.py) against the same rules in DuckDB alone
(pipelines/prepare_reference.py), side by side on one synthetic log.

    python bench/prepare_vs_duckdb.py --rows 5000000
    python bench/prepare_vs_duckdb.py --rows 50000000 --work-dir out/bench

Each side runs in its own process; a sampler reads the RSS of that process and all its
descendants (for Ray: driver, GCS, raylet and workers) every 0.2 s. Reported: wall time of
the whole process (Ray's start included), rows/s, peak RSS of the process tree, and peak
RSS of the largest single process (for Ray: the largest worker, the number that must stay
flat as rows grow), and CPU seconds (user + sys of every process of the tree, last sample of each), which on
a shared, loaded machine is steadier than wall time. Both sides must produce identical counts, or the run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sample_tree(proc: subprocess.Popen, interval: float = 0.2) -> dict[str, float]:
    """Wait for `proc`, sampling its process tree's memory; return peaks in MiB."""
    peaks = {"tree_rss_mib": 0.0, "max_process_rss_mib": 0.0, "max_worker_rss_mib": 0.0}
    cpu_by_pid: dict[int, float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        total = 0.0
        for p in procs:
            try:
                rss = p.memory_info().rss / 2**20
                name = " ".join(p.cmdline()[:1])
                times = p.cpu_times()
                cpu_by_pid[p.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            peaks["max_process_rss_mib"] = max(peaks["max_process_rss_mib"], rss)
            if name.startswith("ray::"):
                peaks["max_worker_rss_mib"] = max(peaks["max_worker_rss_mib"], rss)
        peaks["tree_rss_mib"] = max(peaks["tree_rss_mib"], total)
        time.sleep(interval)
    # Last CPU reading of every process seen (the final < interval of each is missed).
    return {**peaks, "cpu_s": sum(cpu_by_pid.values())}


def timed_run(cmd: list[str], log: Path) -> dict:
    """Run `cmd`, return wall time, memory peaks and the machine's 1-minute load average
    at the end (this machine is shared: a high load means the times are inflated)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        peaks = sample_tree(proc)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": wall, **peaks, "load_avg_1m": os.getloadavg()[0]}


DUCKDB_SIDE = """
import json, sys
sys.path.insert(0, {root!r})
from pipelines.logs import ColumnNames, resolve_inputs
from pipelines.prepare_reference import prepare_with_duckdb
stats = prepare_with_duckdb(resolve_inputs({inp!r}), {out!r}, ColumnNames(), {mu}, {mi}, {ml},
                            threads={threads})
open({stats!r}, "w").write(json.dumps(stats))
"""

COUNT_KEYS = ("input_rows", "rejected", "duplicates_removed", "filtered_out", "truncated",
              "users", "items", "interactions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, required=True, help="synthetic log rows")
    ap.add_argument("--items", type=int, default=0,
                    help="synthetic items (0: the generator's rows / 500); more items give a "
                         "long tail that makes the k-core take several rounds")
    ap.add_argument("--work-dir", default="out/bench", help="logs and outputs go here")
    ap.add_argument("--min-user-interactions", type=int, default=5)
    ap.add_argument("--min-item-interactions", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(),
                    help="DuckDB threads (the local Ray instance has 2 CPUs, jobs/common/ray_runtime.py)")
    ap.add_argument("--prepare-args", default="", help="extra flags for jobs/prepare.py, one string")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    work = (ROOT / args.work_dir).resolve()
    logs = work / (f"syn-{args.rows}" + (f"-items{args.items}" if args.items else ""))
    if not (logs / "_SUCCESS").exists():
        t = time.perf_counter()
        subprocess.run([PY, "jobs/import_data.py", "--dataset", "synthetic", "--rows", str(args.rows),
                        "--items", str(args.items), "--output", str(logs)], cwd=ROOT, check=True)
        (logs / "_SUCCESS").write_text("")
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
    rules = ["--min-user-interactions", str(args.min_user_interactions),
             "--min-item-interactions", str(args.min_item_interactions), "--max-len", str(args.max_len)]

    ray_out = work / f"ray-{args.rows}"
    ray = timed_run([PY, "jobs/prepare.py", "--input", str(logs / "*.parquet"), "--output", str(ray_out),
                     "--overwrite", *rules, *args.prepare_args.split()], work / f"ray-{args.rows}.log")
    ray_stats = json.loads((ray_out / "stats.json").read_text())

    duck_out = work / f"duckdb-{args.rows}"
    duck_stats_path = work / f"duckdb-{args.rows}.json"
    code = DUCKDB_SIDE.format(root=str(ROOT), inp=str(logs / "*.parquet"), out=str(duck_out),
                              mu=args.min_user_interactions, mi=args.min_item_interactions,
                              ml=args.max_len, threads=args.threads, stats=str(duck_stats_path))
    duck = timed_run([PY, "-c", code], work / f"duckdb-{args.rows}.log")
    duck_stats = json.loads(duck_stats_path.read_text())

    mismatched = [k for k in COUNT_KEYS if ray_stats[k] != duck_stats[k]]
    if mismatched:
        raise SystemExit(f"counts differ on {mismatched}: ray {ray_stats} vs duckdb {duck_stats}")

    n = args.rows
    print(f"\nrows={n:,} users={ray_stats['users']:,} items={ray_stats['items']:,} "
          f"interactions={ray_stats['interactions']:,} partitions={ray_stats['partitions']} "
          f"kcore_rounds={ray_stats['kcore_rounds']} (counts identical on both sides)")
    print(f"ray in-pipeline seconds: {ray_stats['seconds']}")
    print(f"cpus={psutil.cpu_count()}")
    print("| side | wall s | rows/s | CPU s | peak RSS tree MiB | peak RSS largest process MiB | "
          "peak RSS largest Ray worker MiB | load avg (1 min) at end |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("ray pipeline", ray), ("duckdb alone", duck)):
        print(f"| {name} | {r['wall_s']:.1f} | {n / r['wall_s']:,.0f} | {r['cpu_s']:.1f} | {r['tree_rss_mib']:,.0f} | "
              f"{r['max_process_rss_mib']:,.0f} | {r['max_worker_rss_mib']:,.0f} | {r['load_avg_1m']:.1f} |")
    ratio = ray["wall_s"] / duck["wall_s"]
    print(f"CPU-time ratio ray/duckdb: {ray['cpu_s'] / duck['cpu_s']:.2f}x (user+sys of the process tree, "
          "sampled; steadier than wall time on a loaded machine)")
    print(f"wall-time ratio ray/duckdb: {ratio:.2f}x "
          f"(excluding Ray start-up: {ray_stats['seconds']['total_s'] / duck['wall_s']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": n, "ray": ray, "duckdb": duck, "ratio": ratio,
                                               "ray_seconds": ray_stats["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
