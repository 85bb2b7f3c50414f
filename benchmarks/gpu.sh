#!/usr/bin/env bash
# The GPU check, from a clean checkout, with the machine's own python3 (no network):
#   bash benchmarks/gpu.sh [OUT_DIR]        (at most 8 minutes on one GPU)
# 1. the CUDA tests (tests/ with -k cuda; they are skipped on CPU machines);
# 2. CE and DLB step timings (benchmarks/gpu_steps.py): ResNet-32 and WRN-20-8 on CIFAR-100 shapes
#    (synthetic uint8 images, 100 classes, batch 128), bf16 autocast, channels_last, compile on/off,
#    1 and 4 concurrent runs on the one GPU; writes OUT_DIR/gpu_steps.md (default benchmarks/results).
# Missing pure-Python dependencies (pydantic) are installed from wheels in .whl/ if the folder exists:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.* pydantic-core annotated-types typing-inspection typing-extensions
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/selfkd-site .whl/*.whl
    export PYTHONPATH="/tmp/selfkd-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu.sh: pydantic is missing and there is no .whl/ folder of wheels (see the header)" >&2; exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
echo "== CUDA tests"
timeout 120 python3 -m pytest -q -x -k "cuda" tests/ 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
echo "== step timings"
timeout 420 python3 benchmarks/gpu_steps.py --out "$OUT/gpu_steps.md"
