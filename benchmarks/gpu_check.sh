#!/usr/bin/env bash
# The GPU check of se_kernels, for a fresh GPU machine that has python3 with torch and Triton
# (torch >= 2.6, Triton >= 3.2) and pytest but no network: build the extension for that GPU,
# run the GPU tests (and compute-sanitizer's memcheck on a small subset, where installed),
# benchmark the op and the models, and end with one summary table. Each step has its own time
# limit (about 9.5 minutes in all), so a hang in one still leaves the others' output.
#
#   bash benchmarks/gpu_check.sh                       # writes into $OUT, else ./gpu_out
#   STEPS="build tests" bash benchmarks/gpu_check.sh   # a subset (build tests sanitizer op model)
#   GPU_ARCH=9.0 (default: the visible GPU's) sets the architecture the build compiles for.
#
# Outputs: summary.txt (ending in the table), env.txt, one log per step, and results/ with
# bench_se's CSV/markdown/PNG and bench_model's CSV/markdown; all of it also packed in
# gpu_check.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-"build tests sanitizer op model"}
mkdir -p "$OUT/results"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
ROWS=()
step() {  # step NAME SECONDS LOG COMMAND...: run with a timeout, log its tail into the summary
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
    local rc=$?
    say "$name: rc=$rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (TIMED OUT after ${limit} s)")"
    tail -n "${TAIL:-3}" "$OUT/$log" | sed 's/^/    /' | tee -a "$SUMMARY" > /dev/null
    ROWS+=("| $name | $rc | $((SECONDS - t0)) | $(grep -E "passed|failed|error" "$OUT/$log" | tail -n 1 | tr '|' '/' | cut -c1-90) |")
    return $rc
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    command -v nvcc && nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
$PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__,
"device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt" >> "$OUT/env.txt"
say "$(tail -n 1 "$OUT/versions.txt")"

# The toolkit torch.utils.cpp_extension compiles with: CUDA_HOME if set, else /usr/local/cuda,
# else the one nvcc belongs to.
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    else CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")"); fi
fi
export CUDA_HOME
say "CUDA_HOME=$CUDA_HOME"
if want build; then
    # The visible GPU's architecture only; in place, so `import se_kernels` from the repository
    # root finds _C.
    GPU_ARCH=${GPU_ARCH:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
    rm -f se_kernels/_C*.so
    step build 120 build.log env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$GPU_ARCH" MAX_JOBS=16 \
        $PY setup.py build_ext --inplace
    $PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
from se_kernels import available_backends, ops
print("    backends on cuda:", available_backends("cuda"), "| extension error:", ops.extension_error())
EOF
fi

if want tests; then
    # The GPU suites (Triton and CUDA backends against the float64 reference, gradcheck,
    # opcheck, compile, CUDA graphs, determinism), the API/conversion tests with a GPU present,
    # and the generic channel-attention path's GPU stages (Triton and CUDA) and their opcheck.
    per_test=""
    $PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=100"
    TAIL=12 step tests 120 tests.log $PY -m pytest -q -p no:cacheprovider $per_test \
        tests/test_cuda.py tests/test_triton.py tests/test_layouts.py tests/test_double_backward.py \
        tests/test_api.py tests/test_channel_attention.py::test_stages_on_gpu \
        tests/test_channel_attention.py::test_opcheck_stage_ops -ra
fi

if want sanitizer; then
    # Out-of-bounds and misaligned accesses of both GPU backends on odd shapes (both plans,
    # both layouts, the epilogue): compute-sanitizer's memcheck, where the machine has it.
    SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/bin/compute-sanitizer 2>/dev/null || true)
    if [ -n "$SANITIZER" ]; then
        TAIL=6 step sanitizer 40 sanitizer.log "$SANITIZER" --tool memcheck --error-exitcode 1 \
            $PY -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_triton.py -k "odd_sizes or odd_and_real_sizes"
    else
        say "sanitizer: compute-sanitizer not found, skipped"
        ROWS+=("| sanitizer | - | 0 | not installed |")
    fi
fi

if want op; then
    # the performance model's predictions for the same sites, to set beside the measurements
    # (benchmarks/gpu_model.py: arithmetic only, seconds)
    TAIL=3 step model_prediction 20 model_prediction.log $PY benchmarks/gpu_model.py \
        --out "$OUT/results/gpu_model_prediction.md"
    # ImageNet SE-ResNet-50 sites, float32 and bfloat16, forward and full (training), every
    # provider (eager, compile, triton, cuda); then the EfficientNet-B0 sites in bfloat16.
    TAIL=30 step bench_op 90 bench_op.log $PY benchmarks/bench_se.py --device cuda \
        --shape-set imagenet-se-resnet50 --dtypes float32 bfloat16 --modes forward full \
        --results-dir "$OUT/results"
    TAIL=20 step bench_op_effnet 50 bench_op_effnet.log $PY benchmarks/bench_se.py --device cuda \
        --shape-set efficientnet-b0 --dtypes float32 bfloat16 --modes forward full --results-dir "$OUT/results"
    # each GPU backend's split and picked (streamed) plans on the same inputs (SE-ResNet-50, batch 256)
    TAIL=44 step bench_plans 80 bench_plans.log $PY benchmarks/bench_plans.py --out "$OUT/results/plans.md"
fi

if want model; then
    # SE overhead in SE-ResNet-18 (CIFAR, batch 128) / SE-ResNet-50 training, bf16 autocast;
    # no torch.compile variants (minutes of compile per model on a cold cache).
    TAIL=20 step bench_model 60 bench_model.log $PY benchmarks/bench_model.py --device cuda --amp \
        --no-compile --target-s 3 --csv "$OUT/results/bench_model_cuda.csv" --md "$OUT/results/bench_model_cuda.md"
fi

{
    echo
    echo "| step | rc | seconds | last result line |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
} | tee -a "$SUMMARY"
tar -C "$OUT" -czf "$OUT/gpu_check.tar.gz" --exclude gpu_check.tar.gz . 2>/dev/null
say "done; everything is also in gpu_check.tar.gz"
