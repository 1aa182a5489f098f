r"""Offline scoring: top-k recommendations for every user of a prepared dataset.

Local (starts a bounded Ray instance):
    python jobs/score.py --model out/distill --data out/ml-1m --output out/scores --k 100
On a cluster (model, data and output on storage every node shares):
    ray job submit --working-dir . -- python jobs/score.py --model /ckpt/student \
        --data /data/prep --output /data/scores --k 100 --num-actors 8

Writes Parquet files under OUTPUT with one row per user: user_id, items (original item
ids, best first) and scores (float32), and _summary.json (settings, users). OUTPUT appears
only once every user of the prepared data is written. A user's whole kept sequence is its
history, and with --exclude-seen (the default) items already in it are not recommended. The work runs
on Ray Data (map_batches over an actor pool; pipelines/scoring.py).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.common.job_paths import refuse_relative_paths_if_submitted
from jobs.common.model_spec import resolve_model_dir
from jobs.common.ray_runtime import check_cpus_left_for_reads, check_gpus, init_local_ray
from pipelines.prepared import num_items, vocabulary_digest
from pipelines.scoring import score_prepared
from slmrec.config import field, parse_config
from slmrec.recommend import Recommender, check_vocabulary


@dataclass
class ScoreConfig:
    model: str = field(help="model directory (OUTPUT/best of a training job) or that job's OUTPUT")
    data: str = field(help="prepared data directory (output of jobs/prepare.py)")
    output: str = field(help="directory for the Parquet output (must not exist yet)")
    k: int = field(100, help="items per user")
    exclude_seen: bool = field(True, help="never recommend items already in the user's kept sequence "
                                                "(as prepare truncated it)")
    int8: bool = field(False, help="score with an int8 (dynamically quantised) copy of the model")
    batch_size: int = field(256, help="users per model call")
    num_actors: int = field(1, help="scoring actors (each holds one copy of the model)")
    cpus_per_actor: float = field(1.0, help="CPUs reserved per actor (torch threads follow it)")
    gpus_per_actor: float = field(0.0, help="GPUs reserved per actor; above 0 the model runs on CUDA "
                                            "(fractions share a GPU between actors; not with --int8)")
    chunk_size: int = field(65536, help="items scored at a time in the top-k (memory: batch x chunk)")
    num_cpus: int = field(2, help="CPUs of the local Ray instance (ignored on a cluster)")

    def __post_init__(self) -> None:
        for name in ("k", "batch_size", "num_actors", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.int8 and self.gpus_per_actor > 0:
            raise ValueError("int8 models run on the CPU only; drop --int8 or --gpus-per-actor")


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(ScoreConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "score")
    model = str(resolve_model_dir(config.model))
    if Path(config.output).exists():
        sys.exit(f"score: --output {config.output} already exists; choose a new directory")
    # Checks that need no Ray run first, so a typo fails at once.
    try:
        items = num_items(config.data)
        check_vocabulary(model, items, vocabulary_digest(config.data))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"score: {e}")
    if config.k > items:
        sys.exit(f"score: --k {config.k} is more than the {items} items of {config.data}")
    init_local_ray(num_cpus=config.num_cpus)
    try:
        check_cpus_left_for_reads(config.num_actors * config.cpus_per_actor,
                                  f"--num-actors {config.num_actors} x --cpus-per-actor {config.cpus_per_actor:g}",
                                  "use fewer actors (or, locally, a larger --num-cpus)")
        if config.gpus_per_actor > 0:
            check_gpus(config.gpus_per_actor, f"--gpus-per-actor {config.gpus_per_actor:g}")
    except ValueError as e:
        sys.exit(f"score: {e}")
    start = time.perf_counter()
    load = functools.partial(Recommender.load, model, int8=config.int8, chunk_size=config.chunk_size,
                             device="cuda" if config.gpus_per_actor > 0 else "cpu")
    settings = {"model": model, "data": config.data, "k": config.k, "exclude_seen": config.exclude_seen,
                "int8": config.int8}
    try:
        users = score_prepared(config.data, config.output, load, config.k, config.exclude_seen,
                               config.batch_size, config.num_actors, config.cpus_per_actor,
                               config.gpus_per_actor, summary=settings)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"score: {e}")
    summary = {**settings, "users": users, "output": config.output,
               "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
