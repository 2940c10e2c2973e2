#!/usr/bin/env bash
# The runs whose accuracy matrices must not move when code is only reorganised (architecture work):
#   experiments/same_results.sh OUT [SRC]   runs them from checkout SRC (default: this one) into OUT/<name>;
# run it for the old and the new code into two folders and compare acc_matrix / metrics.csv per name.
set -u
out=$1
src=${2:-$(cd "$(dirname "$0")/.." && pwd)}
py=${PYTHON:-$src/.venv/bin/python}
export CIL_DATA_ROOT=${CIL_DATA_ROOT:-$src/../shared/data}
mkdir -p "$out"
cd "$src"
run() { "$py" -m cil "$@" threads=1 log.progress=false; }
for m in er er_ace gsa; do
  run experiment=split_mnist method=$m seed=0 hydra.run.dir="$out/mnist_$m" > "$out/mnist_$m.log" 2>&1 &
  run dataset=digits method=$m seed=0 hydra.run.dir="$out/digits_$m" > "$out/digits_$m.log" 2>&1
  wait
done
run dataset=digits method=avalanche_gsa seed=0 checkpoint.at_task_end=false \
  hydra.run.dir="$out/digits_avalanche_gsa" > "$out/digits_avalanche_gsa.log" 2>&1
