#!/usr/bin/env bash
# A lent GPU machine in one command (docs/gpu-check.md, "A lent GPU in one command"): installs the carried wheels
# (`make gpu-bundle` made .gpu/ here), unpacks the CIFAR-10 JPEG copy, measures the graphed and packed steps
# (gpu-check --only graphs), then works through the paper-scale queue until the budget (RUNS_PER_PACK, default 8,
# runs of one kind trained as one pack; 1: one process per run), packing the finished run folders into
# $OUT/queue/runs.tar.gz. BUDGET (seconds, default 540) covers both; DRY_RUN=1 rehearses it on a CPU.
set -euo pipefail
OUT=${OUT:?set OUT to the folder whose files come back}
BUDGET=${BUDGET:-540}
cd "$(dirname "$0")/.."
[ -d .gpu/whl ] && [ -f .gpu/cifar10-jpeg.tar.gz ] || { echo "no .gpu/ bundle: run make gpu-bundle first" >&2; exit 2; }
site=$(mktemp -d) data=$(mktemp -d)
python3 -m pip install --quiet --no-index --no-deps --target "$site" .gpu/whl/*.whl
export PYTHONPATH="$site:$PWD" CIL_DATA_ROOT="$data"
tar -C "$data" -xzf .gpu/cifar10-jpeg.tar.gz
dry=${DRY_RUN:+--dry-run}
graphs=$((BUDGET / 4))
start=$SECONDS
python3 -m cil gpu-check $dry --only graphs --budget "$graphs" --out "$OUT/check" || echo "gpu-check exited $?" >&2
left=$((BUDGET - (SECONDS - start) - 15))  # 15 s for the queue's own start
python3 -m cil gpu-queue $dry --budget "$left" --out "$OUT/queue" --pack "$OUT/queue/runs.tar.gz" \
  --runs-per-pack "${RUNS_PER_PACK:-8}" \
  || echo "gpu-queue exited $? (75: stopped at its budget, resumable)" >&2
