#!/usr/bin/env bash
# GPU check of kldwrm, in under 5 minutes on one GPU:
#   (a) records the GPU, its driver and the torch / CUDA versions      -> env.txt
#   (b) runs the CUDA tests: pytest -q -m cuda tests/test_cuda.py       -> pytest.log
#   (c) runs the step-time benchmark on the GPU (--device cuda): workloads cnn and mlp,
#       N_u 30, sgd adam kfac so q qe kfac-r128                         -> bench.log,
#       benchmarks.json, benchmarks.md
# and writes summary.txt (one line per part). Everything goes to "$OUT" if set, else to
# ./gpu_check/. Nothing is installed: it uses the machine's python3 (torch with CUDA, numpy,
# pytest) with PYTHONPATH=src:. from the repository root. Every part runs even if an
# earlier one failed (but nothing runs on the CPU in place of the GPU: without CUDA it stops
# after (a)). Exit status 0 when every part passed, 1 otherwise, 2 without CUDA.
#
#   bash benchmarks/gpu_check.sh
#   python -m benchmarks.run --merge gpu_check/benchmarks.json   # then, on the dev machine
#
# Settings (environment): PYTHON (python3), GPU_CHECK_STEPS (timed steps per method, 210),
# GPU_CHECK_TEST_TIMEOUT (s, 100), GPU_CHECK_BENCH_TIMEOUT (s, 170).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
STEPS="${GPU_CHECK_STEPS:-210}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-100}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-170}"
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
failed=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# -- (a) the machine --------------------------------------------------------------------------
{
    echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
        --format=csv 2>&1 || echo "nvidia-smi failed"
    timeout 60 "$PY" - <<'EOF' 2>&1 || echo "python/torch check failed"
import platform
import torch

print("python", platform.python_version())
print("torch", torch.__version__, "| CUDA runtime", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
EOF
} >"$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"
if ! timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    note "(a) environment: CUDA NOT AVAILABLE to $PY; stopping (nothing is run on the CPU)"
    exit 2
fi
note "(a) environment: ok ($(grep -m1 '^device 0' "$OUT_DIR/env.txt"))"

# -- (b) the CUDA tests -------------------------------------------------------------------------
timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    2>&1 | tee "$OUT_DIR/pytest.log"
test_rc=$?
tail_line="$(grep -E '(passed|failed|error|skipped)' "$OUT_DIR/pytest.log" | tail -n 1)"
if [ "$test_rc" -eq 124 ] || [ "$test_rc" -eq 137 ]; then
    note "(b) CUDA tests: TIMED OUT after ${TEST_TIMEOUT}s"
    failed=1
elif [ "$test_rc" -ne 0 ]; then
    note "(b) CUDA tests: FAILED (exit $test_rc): $tail_line"
    failed=1
elif grep -qE '[0-9]+ skipped' <<<"$tail_line"; then
    note "(b) CUDA tests: SOME SKIPPED on a GPU machine: $tail_line"
    failed=1
else
    note "(b) CUDA tests: passed: $tail_line"
fi

# -- (c) the step-time benchmark on the GPU ----------------------------------------------------------
timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m benchmarks.run --device cuda --stages step_time \
    --workloads cnn,mlp --update-freqs 30 --methods sgd,adam,kfac,so,q,qe,kfac-r128 \
    --steps "$STEPS" --fresh --out "$OUT_DIR/benchmarks.md" --note "benchmarks/gpu_check.sh" \
    2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=$?
check="$("$PY" - "$OUT_DIR/benchmarks.json" <<'EOF' 2>&1
import json
import sys

try:
    store = json.load(open(sys.argv[1]))
except OSError:
    print("no benchmarks.json written")
    sys.exit(1)
rows = store["stages"].get("step_time", {}).get("rows", [])
devices = sorted({r["device"] for r in rows})
cells = sorted({r["workload"] for r in rows})
gpu = store["runs"][-1]["info"].get("GPU", "no GPU recorded")
print(f"{len(rows)} rows, workloads {cells}, devices {devices}, {gpu}")
sys.exit(0 if rows and all(d.startswith("cuda") for d in devices) else 1)
EOF
)"
check_rc=$?
if [ "$bench_rc" -ne 0 ] || [ "$check_rc" -ne 0 ]; then
    note "(c) benchmark: FAILED or incomplete (exit $bench_rc): $check"
    failed=1
else
    note "(c) benchmark: ok: $check"
fi
[ -f "$OUT_DIR/benchmarks.md" ] && sed -n '/^| workload | N_u/,/^$/p' "$OUT_DIR/benchmarks.md"
note "files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit "$failed"
