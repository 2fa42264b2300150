#!/usr/bin/env bash
# The speed benchmark on one GPU, in one call: SD-1.5-shaped random-weight model at 512 px, every row of
# `bench_all` (diffusers-style step, ours full FT, LoRA, packed LoRA for K = 1/4/8/16, prior images/s) and one
# subject end to end, written to $OUT/bench.md (+ bench.json, bench.log).
#   bash scripts/gpu_bench.sh            # ~5-7 min on an H100/H200 (no torch.compile)
# Env: STEPS (timed steps per row, default 10), E2E=0 to skip the end-to-end row, E2E_MODE (lora|full),
#      E2E_STEPS / E2E_PRIORS (default 1000 / 200), OUT (default ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -c "import dreambooth_lib" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt" || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
STEPS="${STEPS:-10}" E2E="${E2E:-1}" E2E_MODE="${E2E_MODE:-lora}" \
E2E_STEPS="${E2E_STEPS:-1000}" E2E_PRIORS="${E2E_PRIORS:-200}" OUT="$OUT" \
timeout 470 "$PY" - <<'PY' 2>&1 | tee "$OUT/bench.log"
import json, os, time
import torch
from dreambooth_lib import bench, models, train
from dreambooth_lib.config import TrainConfig

out = os.environ["OUT"]
started = time.time()

# 1. no host syncs inside a training step (full and packed), checked by CUDA itself on the tiny model
import tempfile
from pathlib import Path
from dreambooth_lib import packed
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
    e2e=os.environ["E2E"] == "1", e2e_mode=os.environ["E2E_MODE"],
    e2e_counts={"train_steps": int(os.environ["E2E_STEPS"]), "prior_images": int(os.environ["E2E_PRIORS"])},
    out_markdown=f"{out}/bench.md",
)
result["total_wall_s"] = time.time() - started
json.dump(result, open(f"{out}/bench.json", "w"), indent=2, default=str)
print(f"bench done in {result['total_wall_s']:.0f} s; table in {out}/bench.md")
PY
