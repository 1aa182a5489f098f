r"""Prepare stage: Parquet interaction logs -> per-user sequences for training.

Local (starts a bounded Ray instance):
    python jobs/prepare.py --input out/logs/ml-1m.parquet --output out/ml-1m \
        --min-user-interactions 5 --min-item-interactions 5 --max-len 50
On a cluster (input and output on storage all nodes share):
    ray job submit --working-dir . -- python jobs/prepare.py --input /data/logs --output /data/prep

Writes OUT/sequences/*.parquet, OUT/items/*.parquet and OUT/stats.json; the rules and the
row accounting are described in pipelines/prepare.py.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json

from jobs.common.job_paths import refuse_relative_paths_if_submitted
from jobs.common.ray_runtime import init_local_ray
from pipelines.logs import LogError
from pipelines.prepare import PrepareConfig, SettingsError, preflight, run_prepare
from slmrec.config import parse_config


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(PrepareConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "prepare")
    try:
        schema = preflight(config)  # bad input fails here, before Ray starts
        init_local_ray()
        stats = run_prepare(config, schema)
    except (LogError, SettingsError, FileExistsError) as e:
        # A LogError raised in a Ray task arrives as RayTaskError(LogError), whose text is
        # the remote traceback; the message is its cause's.
        sys.exit(f"prepare: {getattr(e, 'cause', None) or e}")
    summary = {k: stats[k] for k in ("input_rows", "rejected", "duplicates_removed",
                                     "filtered_out", "truncated", "users", "items",
                                     "interactions", "seconds")}
    print(json.dumps(summary, indent=2))
    return stats


if __name__ == "__main__":
    main()
