#!/usr/bin/env bash
# The speed benchmark on one GPU, in one call (≤ 9 min): the GPU-only tests (CUDA-graph step = eager step, no
# host syncs), then every row of `bench_all` on an SD-1.5-shaped random-weight model at 512 px (diffusers-style
# step, ours full FT and LoRA, each also as a replayed CUDA graph, packed LoRA for K = 1/4/8/16, prior images/s,
# one subject end to end), then prior sampling with a torch.compile'd UNet if time is left.
# Writes $OUT/bench.md (+ bench.json, bench.log, gpu_tests.log, prior_compiled.md, gpu.txt).
#   bash scripts/gpu_bench.sh
# A machine without the project's dependencies (and no PyPI): run `bash scripts/gpu_wheels.sh` where pip works,
# carry .whl/ along; they are installed from there into /tmp/site.
# Env: BUDGET (seconds for the whole script, default 540), STEPS (timed steps per row, 10), E2E=0 to skip the
#      end-to-end row, E2E_MODE (lora|full), E2E_STEPS / E2E_PRIORS (1000 / 200), CUDA_GRAPH=0 to leave the graph
#      rows out, PRIOR_COMPILE=0 to skip the compiled-prior rows, OUT (default ./bench-out), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
BUDGET="${BUDGET:-540}"
left() { echo $(( BUDGET - ($(date +%s) - started) )); }
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
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
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt" || true
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. correctness first: the CUDA-graph step repeats the eager run and syncs with nothing
echo "== GPU tests ($(left) s left)"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_paths.py 2>&1 | tee "$OUT/gpu_tests.log" \
  || echo "GPU tests FAILED or timed out (see gpu_tests.log); the bench goes on"

# 2. every row, the table written after each one
echo "== bench ($(left) s left)"
STEPS="${STEPS:-10}" E2E="${E2E:-1}" E2E_MODE="${E2E_MODE:-lora}" CUDA_GRAPH="${CUDA_GRAPH:-1}" \
E2E_STEPS="${E2E_STEPS:-1000}" E2E_PRIORS="${E2E_PRIORS:-200}" OUT="$OUT" \
timeout "$(( $(left) - 20 ))" "$PY" - <<'PY' 2>&1 | tee "$OUT/bench.log"
import json, os, tempfile, time
from pathlib import Path

import torch
from benchmarks import train_speed as bench
from dreambooth_lib import models, train
from dreambooth_lib.config import TrainConfig

out = os.environ["OUT"]
started = time.time()
# no host syncs inside the eager steps either (full and packed), checked by CUDA itself on the tiny model
with tempfile.TemporaryDirectory() as tmp:
    tiny = str(models.build_tiny_model(Path(tmp) / "tiny"))
    uris = bench._write_images(Path(tmp) / "i", 2, 64, seed=1)
    config = TrainConfig(resolution=64, device="cuda")
    t = train.setup_training(models.load_pipeline(tiny), uris, uris, "a sks dog", "a dog", config, "cuda")
    step_p = bench._packed_step_fn(models.load_pipeline(tiny), 3, config.model_copy(update={"mode": "lora"}),
                                   torch.device("cuda"), Path(tmp) / "p", 64)
    tracker = train.LossTracker(torch.device("cuda"))
    for s in range(3):
        tracker.add(train.train_step(t), s); step_p()
    torch.cuda.synchronize()
    for name, fn in (("train_step", lambda: tracker.add(train.train_step(t), 9)), ("packed_step", step_p)):
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(); fn()
            print(f"host syncs in {name}: none")
        except RuntimeError as err:
            print(f"host syncs in {name}: {err}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    del t, step_p
result = bench.bench_all(
    sd15_shape=True, resolution=512, device="cuda", steps=int(os.environ["STEPS"]), ks=(1, 4, 8, 16),
    e2e=os.environ["E2E"] == "1", e2e_mode=os.environ["E2E_MODE"], cuda_graph=os.environ["CUDA_GRAPH"] == "1",
    e2e_counts={"train_steps": int(os.environ["E2E_STEPS"]), "prior_images": int(os.environ["E2E_PRIORS"])},
    out_markdown=f"{out}/bench.md",
)
result["total_wall_s"] = time.time() - started
json.dump(result, open(f"{out}/bench.json", "w"), indent=2, default=str)
print(f"bench done in {result['total_wall_s']:.0f} s; table in {out}/bench.md")
PY

# 3. prior sampling with a compiled UNet, if the budget allows (compiling alone takes a minute or two)
if [ "${PRIOR_COMPILE:-1}" = 1 ] && [ "$(left)" -gt 100 ]; then
  echo "== compiled prior sampling ($(left) s left)"
  OUT="$OUT" timeout "$(( $(left) - 5 ))" "$PY" - <<'PY' 2>&1 | tee -a "$OUT/bench.log"
import json, os
from dreambooth_lib import bench

p = bench.bench_prior(bench.build_sd15_shaped_pipeline(), "cuda", num_images=64, naive_images=4, steps=25,
                      batch_size=32, resolution=512, compiled=True)
lines = ["| prior sampling, batch 32, 25 steps | images/s | warm-up s | peak memory GiB |", "|---|---:|---:|---:|"]
for way in ("naive", "ours", "compiled"):
    f = p[way]
    lines.append(f"| {way} ({f['dtype']}, batch {f['batch_size']}) | {f['images_per_s']:.2f} | "
                 f"{f['warm_up_s']:.1f} | {f['peak_memory_bytes'] / 2**30:.2f} |")
table = "\n".join(lines) + "\n"
print(table)
open(f"{os.environ['OUT']}/prior_compiled.md", "w").write(table)
json.dump(p, open(f"{os.environ['OUT']}/prior_compiled.json", "w"), indent=2)
PY
else
  echo "compiled prior sampling skipped ($(left) s left)"
fi
echo "== done in $(( $(date +%s) - started )) s"
