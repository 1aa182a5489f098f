#!/usr/bin/env bash
# A two-node Ray cluster on this one machine, and jobs/distill.py submitted to it with
# `ray job submit`, its two Ray Train workers on different nodes.
#
#   cluster/local_two_node.sh [WORKDIR]          # default WORKDIR: a fresh /tmp/slmrec2n.XXXX
#   DATA=out/ml-1m TEACHER=runs/teacher cluster/local_two_node.sh
#
# Without DATA/TEACHER it writes tiny ones (tests/cluster_inputs.py). Nodes (see
# cluster/local_cluster.py): the head at 127.0.0.1 with HEAD_CPUS logical CPUs and the
# dashboard, a worker node at 127.0.0.2 with WORKER_CPUS, each with its own temp dir under
# WORKDIR and ports chosen free. Each Ray Train worker asks for CPUS_PER_WORKER CPUs, more
# than half of either node, so no node can hold both and Ray must place one per node; the
# head keeps at least one CPU free for Ray Data. The script checks that placement through
# the state API, waits for SUCCEEDED, checks the outputs, and on exit (success, failure or
# Ctrl-C) stops only the processes it started (never `ray stop`, which would stop every
# Ray of the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RAY="$(dirname "$PY")/ray"
WORK=$(realpath -m "${1:-$(mktemp -d /tmp/slmrec2n.XXXXXX)}")
HEAD_CPUS=${HEAD_CPUS:-3}
WORKER_CPUS=${WORKER_CPUS:-2}
CPUS_PER_WORKER=${CPUS_PER_WORKER:-1.6}
EPOCHS=${EPOCHS:-2}
mkdir -p "$WORK"
# Job drivers inherit the nodes' PATH: `python` in the entrypoint is this environment's.
export PATH="$(realpath "$(dirname "$PY")"):$PATH"
# Ray 2.60 enables token auth on the head by default; clients present the token when told.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

trap '"$PY" cluster/local_cluster.py stop --workdir "$WORK"' EXIT
"$PY" cluster/local_cluster.py start --workdir "$WORK" --cpus "$HEAD_CPUS" "$WORKER_CPUS"
ADDRESS=$("$PY" cluster/local_cluster.py address --workdir "$WORK")

if [[ -z "${DATA:-}" || -z "${TEACHER:-}" ]]; then
  read -r DATA TEACHER < <("$PY" tests/cluster_inputs.py "$WORK/inputs")
fi
OUTPUT="$WORK/distill"

# Watch where the Ray Train workers land while the job runs.
"$PY" - "$ADDRESS" > "$WORK/placement.txt" <<'EOF' &
import sys, time
from ray.util.state import list_actors
seen = {}
deadline = time.time() + 900
while time.time() < deadline and len(seen) < 2:
    try:
        for a in list_actors(address=sys.argv[1], filters=[("class_name", "=", "RayTrainWorker"),
                                                          ("state", "=", "ALIVE")]):
            seen[a.actor_id] = a.node_id
    except Exception:
        pass
    time.sleep(1)
print(len(set(seen.values())))
EOF
WATCHER=$!

# The job's own runtime_env: the repository as working_dir (uploaded, unpacked on every
# node, put on the import path), plus the variables of cluster/runtime_env.yaml.
"$RAY" job submit --address "$ADDRESS" --runtime-env cluster/runtime_env.yaml --working-dir . -- \
  python jobs/distill.py --data "$(realpath "$DATA")" --teacher "$(realpath "$TEACHER")" \
  --output "$OUTPUT" --epochs "$EPOCHS" --num-workers 2 --cpus-per-worker "$CPUS_PER_WORKER" \
  --student-layers 1 --blocks 1 --ms-weight 0 --batch-size 8 --warmup-steps 2 --max-len 12 --no-probe \
  | tee "$WORK/job.log"

wait "$WATCHER" || true
NODES=$(cat "$WORK/placement.txt" || echo 0)
grep -q "Job 'raysubmit_.*' succeeded" "$WORK/job.log" || { echo "FAIL: job did not succeed"; exit 1; }
for f in best/meta.json best/model.safetensors metrics.json REPORT.md report.json; do
  [[ -s "$OUTPUT/$f" ]] || { echo "FAIL: missing $OUTPUT/$f"; exit 1; }
done
[[ "$NODES" == 2 ]] || { echo "FAIL: Ray Train workers ran on $NODES node(s), expected 2"; exit 1; }
echo "OK: job SUCCEEDED, 2 Ray Train workers on 2 nodes, outputs in $OUTPUT"
