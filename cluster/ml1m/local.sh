#!/usr/bin/env bash
# The whole ML-1M recipe of this directory on one machine's CPUs (local Ray, fp32), as the
# README's ml1m200h runs were made:
#
#   bash cluster/ml1m/local.sh                 # ~6.5 h on 2 idle AVX2 cores; rerun it to go on
#   RUNS=runs/other bash cluster/ml1m/local.sh  # another output root (data stays in $OUT)
#
# Every stage whose REPORT.md exists is skipped; a training stage that was stopped resumes
# from its last checkpoint (every 20 steps), so the recipe can be run across several
# sittings. The YAML files are the cluster's; only paths and the device differ here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out}
RUNS=${RUNS:-runs/ml1m200h}
THREADS=${THREADS:-2}
LOGS=$OUT/logs/ml-1m
DATA=$OUT/ml-1m-full200h
LOCAL=(--no-use-gpu --torch-threads "$THREADS" --checkpoint-every-steps 20)

stage() {  # stage NAME: true when NAME still has to run
    if [ -f "$RUNS/$1/REPORT.md" ]; then
        echo "[ml1m] $RUNS/$1 is finished; skipped"
        return 1
    fi
    echo "[ml1m] $RUNS/$1: $(date -u +%FT%TZ)"
}

[ -n "$(ls "$LOGS"/*.parquet 2>/dev/null)" ] \
    || $PY jobs/import_data.py --dataset ml-1m --output "$LOGS"
[ -f "$DATA/stats.json" ] \
    || $PY jobs/prepare.py --input "$LOGS" --output "$DATA" \
        --min-user-interactions 1 --min-item-interactions 1 --max-len 200
if stage items200tov; then
    $PY jobs/pretrain_items.py --config cluster/ml1m/items.yaml --data "$DATA" \
        --output "$RUNS/items200tov" "${LOCAL[@]}"
fi
if stage teacher-tov; then
    $PY jobs/train_teacher.py --config cluster/ml1m/teacher.yaml --data "$DATA" \
        --item-table "$RUNS/items200tov" --output "$RUNS/teacher-tov" "${LOCAL[@]}"
fi
if stage student-tov; then
    $PY jobs/distill.py --config cluster/ml1m/student.yaml --data "$DATA" \
        --teacher "$RUNS/teacher-tov" --output "$RUNS/student-tov" "${LOCAL[@]}"
fi
echo "[ml1m] done: $(date -u +%FT%TZ)"
