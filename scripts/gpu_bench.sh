#!/usr/bin/env bash
# The speed benchmark on one GPU, in one call (≤ 9 min): the GPU-only tests (CUDA-graph step = eager step, no
# host syncs), a host-sync check of the eager steps, then every row of `python -m benchmarks all` on an
# SD-1.5-shaped random-weight model at 512 px (diffusers-style step, ours full FT and LoRA, each also as a replayed
# CUDA graph, packed LoRA for K = 1/4/8/16, prior images/s, one subject end to end), then the FLUX.1 LoRA step on a
# FLUX.1-dev-shaped random transformer (bf16 base; checkpointed; packed K = 2/4), then train.select's probe
# overhead (400 LoRA steps with and without a probe every 100), then prior sampling with a torch.compile'd UNet if
# time is left.
# Writes $OUT/bench.md (+ bench.json, bench.log, gpu_tests.log, flux.md/.json, probes.md/.json,
# prior_compiled.md/.json, gpu.txt).
#   bash scripts/gpu_bench.sh
# A machine without the project's dependencies (and no PyPI): run `bash scripts/gpu_wheels.sh` where pip works,
# carry .whl/ along; they are installed from there into /tmp/site.
# Env: BUDGET (seconds for the whole script, default 540), STEPS (timed steps per row, 10), E2E=0 to skip the
#      end-to-end row, E2E_MODE (lora|full), E2E_STEPS / E2E_PRIORS (1000 / 200), CUDA_GRAPH=0 to leave the graph
#      rows out, FLUX=0 to skip the FLUX.1 LoRA rows, PROBES=0 to skip the probe overhead, PRIOR_COMPILE=0 to skip the compiled-prior rows, OUT
#      (default ./bench-out), PYTHON.
#      GPU_BENCH_SMOKE=1: every step on the CPU with a fresh tiny model (and a tiny FLUX.1) and tiny counts (a minute or so), the GPU
#      tests only collected and prior sampling not compiled: tests/test_bench.py runs it, so the script cannot rot
#      before it meets a GPU.
# Exits 1 when any step failed (the steps after it still run).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
BUDGET="${BUDGET:-540}"
left() { echo $(( BUDGET - ($(date +%s) - started) )); }
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0
failed() { echo "FAILED: $1 (see $OUT)" >&2; status=1; }

if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then
  DEVICE=cpu
  PYTEST_MODE=(--collect-only)
  ALL_ARGS=(--resolution 32 --steps 1 --warmup 0 --ks 1,2 --prior-images 2 --prior-steps 2
            --e2e-steps "${E2E_STEPS:-2}" --e2e-priors "${E2E_PRIORS:-2}")
  PRIOR_ARGS=(--resolution 32 --images 2 --naive-images 1 --steps 2 --batch-size 2)
  FLUX_ARGS=(--steps 1 --warmup 0 --ks 1,2)
  PROBE_ARGS=(--resolution 32 --steps 4 --every 2 --repeats 1)
else
  DEVICE=cuda
  PYTEST_MODE=()
  ALL_ARGS=(--sd15-shape --resolution 512 --steps "${STEPS:-10}" --ks 1,4,8,16
            --e2e-steps "${E2E_STEPS:-1000}" --e2e-priors "${E2E_PRIORS:-200}")
  PRIOR_ARGS=(--sd15-shape --resolution 512 --images 64 --naive-images 4 --steps 25 --batch-size 32 --compiled)
  FLUX_ARGS=(--flux-shape --resolution 512 --steps "${STEPS:-10}" --ks 1,2,4)
  PROBE_ARGS=(--sd15-shape --resolution 512 --steps 400 --every 100 --repeats 1)
fi
[ "${E2E:-1}" = 1 ] && ALL_ARGS+=(--e2e --e2e-mode "${E2E_MODE:-lora}")
[ "${CUDA_GRAPH:-1}" = 1 ] || ALL_ARGS+=(--no-cuda-graph)

if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
if ! "$PY" -c "import benchmarks.train_speed, diffusers, pydantic" 2>"$OUT/import.err"; then
  cat "$OUT/import.err" >&2
  echo "the project does not import here: run 'bash scripts/gpu_wheels.sh' on a machine with pip, carry .whl/" >&2
  exit 1
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. correctness first: the CUDA-graph step repeats the eager run and syncs with nothing
echo "== GPU tests ($(left) s left)"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${PYTEST_MODE[@]}" tests/test_fast_paths.py 2>&1 \
  | tee "$OUT/gpu_tests.log" || failed "GPU tests (gpu_tests.log)"

# 2. no host syncs inside the eager steps either (full and packed), checked by CUDA itself on the tiny model
echo "== host syncs ($(left) s left)"
timeout 300 "$PY" -m benchmarks host-syncs --device "$DEVICE" 2>&1 | tee "$OUT/bench.log" \
  || failed "host-sync check (bench.log)"

# 3. every row, the table rewritten after each one (progress on stderr into bench.log, the figures as JSON)
echo "== bench ($(left) s left)"
timeout "$(( $(left) - 20 ))" "$PY" -m benchmarks all --device "$DEVICE" "${ALL_ARGS[@]}" --out "$OUT/bench.md" \
  --json >"$OUT/bench.json" 2> >(tee -a "$OUT/bench.log" >&2) || failed "bench (bench.log)"
cat "$OUT/bench.md" 2>/dev/null

# Steps 4-6 each run only when enabled and the budget leaves at least NEED seconds, stopping SPARE seconds before
# it ends: table(NAME, TITLE, ENABLED, NEED, SPARE, benchmarks args...) writes $OUT/NAME.md and $OUT/NAME.json.
table() {
  local name=$1 title=$2 enabled=$3 need=$4 spare=$5
  shift 5
  if [ "$enabled" = 1 ] && [ "$(left)" -gt "$need" ]; then
    echo "== $title ($(left) s left)"
    timeout "$(( $(left) - spare ))" "$PY" -m benchmarks "$@" --device "$DEVICE" --out "$OUT/$name.md" --json \
      >"$OUT/$name.json" 2> >(tee -a "$OUT/bench.log" >&2) || failed "$title (bench.log)"
    cat "$OUT/$name.md" 2>/dev/null
  else
    echo "$title skipped ($(left) s left)"
  fi
}

# 4. FLUX.1 LoRA: a FLUX.1-dev-shaped transformer (random, bf16 base): one subject, checkpointed, packed
table flux "FLUX.1 LoRA step" "${FLUX:-1}" 120 60 flux "${FLUX_ARGS[@]}"
# 5. train.select's probes: the same LoRA run with and without them (the overhead the issue bounds at ~15 %)
table probes "train.select probe overhead" "${PROBES:-1}" 150 30 probes "${PROBE_ARGS[@]}"
# 6. prior sampling with a compiled UNet, if the budget allows (compiling alone takes a minute or two)
table prior_compiled "compiled prior sampling" "${PRIOR_COMPILE:-1}" 100 5 prior "${PRIOR_ARGS[@]}"
echo "== done in $(( $(date +%s) - started )) s"
exit "$status"
