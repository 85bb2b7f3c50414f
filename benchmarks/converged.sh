#!/usr/bin/env bash
# The converged-regime study (issue 12): three sweeps shared by two 1-thread processes, then the reports.
# Run from the repository root: bash benchmarks/converged.sh [--reports-only]
# Each process walks the files in priority order (core, noise, methods); runs are claimed one at a time
# with a lock, so the two processes never train the same run and move on to the next file together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${1:-}" != "--reports-only" ]; then
  worker() { for f in core noise methods; do "$PY" -m selfkd sweep "configs/cpu/converged_$f.yaml" --threads 1 --no-progress; done; }
  worker > benchmarks/runs/converged_worker1.log 2>&1 &
  sleep 20  # the first process plans and claims before the second starts
  worker > benchmarks/runs/converged_worker2.log 2>&1
  wait
fi
R=benchmarks/runs
OUT=benchmarks/results/converged_cifar10
C=$R/converged_core
# 1+2: equal epochs, equal compute, the halved comparison and repeat_fraction, against CE at E
"$PY" -m selfkd report $C --baseline "method=ce, epochs=100" --out $OUT/core
# 3: label noise at convergence, each noise type against its CE at E
for n in sym40 asym40; do
  "$PY" -m selfkd report $R/converged_noise/noise=$n --baseline "method=ce, epochs=100" --out $OUT/noise_$n
done
# 4: the methods at equal epochs, with CE, DLB and the equal-compute CE of the core sweep
"$PY" -m selfkd report $R/converged_methods $C/setting=ce $C/setting=dlb $C/setting=ce-200ep --baseline "method=ce, epochs=100" --out $OUT/methods
