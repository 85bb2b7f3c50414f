#!/usr/bin/env bash
# The GPU campaign in one call, and its CPU smoke run (CI runs it: `make gpu-smoke`).
#   bash benchmarks/gpu.sh [OUT_DIR]           on one CUDA GPU, at most 8 minutes; OUT_DIR default benchmarks/results
#   bash benchmarks/gpu.sh --smoke [OUT_DIR]   on the CPU, tiny sizes, the same stages and entry points; OUT_DIR
#                                              default a new temp dir (never benchmarks/results)
# Python: $PYTHON, default python3. Stages, each under its own time bound (seconds, `timeout`):
#   setup 10 | CUDA tests 60 | step timings 145 | accuracy 235 | the table after each stage 4 x 4, and 1 s
#   to kill each table and 2 s each stage past its bound: 450 + 20 + 8 = 478 (tests/test_gpu_campaign.py sums them)
# 1. setup: pydantic and the other pure-Python dependencies the machine lacks are installed offline from .whl/
#    (`make gpu-pack` fills it) into a temp folder on PYTHONPATH, as is this checkout; OUT_DIR/gpu_env.json.
# 2. the CUDA tests (`pytest -k cuda`; skipped in the smoke run: they need CUDA) -> OUT_DIR/gpu_tests.txt;
# 3. step timings, benchmarks/gpu_steps.py -> OUT_DIR/gpu_steps.jsonl;
# 4. ResNet-32 CE and DLB side by side on the full CIFAR-10 JPEG set, benchmarks/gpu_accuracy.py
#    (data: $GPU_DATA, default .gpudata/cifar10-jpeg.tar.gz, else ../shared/data/cifar10-jpeg.tar.gz);
# after every stage benchmarks/gpu_report.py rewrites OUT_DIR/gpu.md from what is there, so a run cut
# off anywhere keeps a table. A failing or cut-off stage: the smoke run stops with exit status 1; the
# GPU run goes on with the next stage and exits 1 at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
PY="${PYTHON:-python3}"
if [ "$SMOKE" = 1 ]; then
  OUT="${1:-$(mktemp -d "${TMPDIR:-/tmp}/selfkd-gpu-smoke.XXXXXX")}"
  mkdir -p "$OUT"
  if [ "$(cd "$OUT" && pwd -P)" = "$(cd benchmarks/results && pwd -P)" ]; then
    echo "gpu.sh: --smoke never writes benchmarks/results (give another OUT_DIR)" >&2; exit 2
  fi
else
  OUT="${1:-benchmarks/results}"
  mkdir -p "$OUT"
fi
OUT="$(cd "$OUT" && pwd -P)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/selfkd-gpu-work.XXXXXX")"  # the accuracy runs, the wheels' install
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT"/gpu.md "$OUT"/gpu_env.json "$OUT"/gpu_stages.jsonl "$OUT"/gpu_tests.txt "$OUT"/gpu_steps.jsonl \
      "$OUT"/gpu_accuracy.json "$OUT"/gpu_epochs.jsonl
DATA="${GPU_DATA:-}"
if [ -z "$DATA" ]; then
  for d in .gpudata/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
    if [ -f "$d" ]; then DATA="$d"; break; fi
  done
fi
if [ -z "$DATA" ] || [ ! -f "$DATA" ]; then
  echo "gpu.sh: no CIFAR-10 JPEG archive: set GPU_DATA or run \`make gpu-pack\` (copies it to .gpudata/)" >&2; exit 2
fi
REPORT=("$PY" benchmarks/gpu_report.py "$OUT")
if [ "$SMOKE" = 1 ]; then REPORT+=(--smoke); fi
FAILED=0

# stage NAME BOUND_S CMD...: run CMD under `timeout BOUND_S`, record it, rewrite the table
stage() {
  local name="$1" bound="$2" rc=0 t0 ms status
  shift 2
  echo "== $name (at most ${bound} s)"
  t0=$(date +%s%N)
  timeout -k 2 "$bound" "$@" || rc=$?
  case "$rc" in
    0) status=ok ;;
    124|137) status="cut off at its time bound" ;;
    *) status="failed (exit $rc)" ;;
  esac
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '{"stage": "%s", "bound_s": %s, "took_s": %d.%03d, "status": "%s"}\n' "$name" "$bound" \
    $((ms / 1000)) $((ms % 1000)) "$status" >> "$OUT/gpu_stages.jsonl"
  timeout -k 1 4 "${REPORT[@]}" || echo "gpu.sh: the table could not be written" >&2
  if [ "$rc" != 0 ]; then
    echo "gpu.sh: stage $name: $status" >&2
    FAILED=1
    if [ "$SMOKE" = 1 ]; then exit 1; fi
  fi
}

setup() {
  if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if [ ! -d .whl ]; then
      echo "gpu.sh: pydantic is missing and there is no .whl/ folder of wheels (run \`make gpu-pack\` where pip works)" >&2
      return 2
    fi
    "$PY" -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --no-warn-conflicts --target "$WORK/site" pydantic
  fi
  "$PY" - "$OUT/gpu_env.json" "$SMOKE" <<'PY'
import json, platform, subprocess, sys, time
import torch
import selfkd  # from this checkout (PYTHONPATH), with its dependencies
import pydantic, yaml, tqdm  # noqa: F401
smoke = sys.argv[2] == "1"
cuda = torch.cuda.is_available()
if not cuda and not smoke:
    sys.exit("gpu.sh: no CUDA device (use --smoke for the CPU run)")
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
env = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
       "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
       "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
       "selfkd": selfkd.__file__, "commit": commit or "unknown", "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
if cuda:
    p = torch.cuda.get_device_properties(0)
    env.update(gpu_memory_gib=p.total_memory / 2**30, multiprocessors=p.multi_processor_count)
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
print(json.dumps(env))
PY
}

export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PY OUT WORK SMOKE
export -f setup
stage setup 10 bash -c setup
if [ "$FAILED" = 1 ]; then exit 1; fi  # nothing else can run without the environment

if [ "$SMOKE" = 1 ]; then
  echo "skipped: the CUDA tests need CUDA (on the CPU they skip themselves in \`make test\`)" > "$OUT/gpu_tests.txt"
  stage steps 145 "$PY" benchmarks/gpu_steps.py --out "$OUT/gpu_steps.jsonl" --device cpu --models resnet8 \
    --compile off on --compile-backend eager --runs 1 --batch 16 --steps 2 --warmup 1 --budget 135
  stage accuracy 235 "$PY" benchmarks/gpu_accuracy.py --data "$DATA" --runs "$WORK/runs" --plan "$OUT/gpu_accuracy.json" \
    --device cpu --model resnet8 --batch-size 32 --train-per-class 20 --test-per-class 10 --epochs 2 \
    --steps "$OUT/gpu_steps.jsonl" --budget 200  # 2 epochs, a generous bound: a loaded CPU must not fail the smoke
    # (the auto epoch choice is checked against hand-computed values in tests/test_gpu_campaign.py)
else
  stage tests 60 bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider -k cuda --continue-on-collection-errors \
    tests/ 2>&1 | tail -15 | tee '$OUT/gpu_tests.txt'"
  stage steps 145 "$PY" benchmarks/gpu_steps.py --out "$OUT/gpu_steps.jsonl" --budget 135
  stage accuracy 235 "$PY" benchmarks/gpu_accuracy.py --data "$DATA" --runs "$WORK/runs" --plan "$OUT/gpu_accuracy.json" \
    --epochs auto --steps "$OUT/gpu_steps.jsonl" --budget 220
fi
echo "gpu.sh: table in $OUT/gpu.md"
exit "$FAILED"
