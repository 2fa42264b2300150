"""Host-sync check of the eager training steps: on CUDA, `torch.cuda.set_sync_debug_mode("error")` turns any
device-to-host read inside a step (`.item()`, `bool(tensor)`, a sync copy) into an error naming it.

Run by scripts/gpu_bench.sh before the benchmark. On a CPU the same steps run (so the check's set-up cannot rot
before it meets a GPU) but nothing can be checked: a CPU has no device to wait for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks import train_speed as bench
from dreambooth_lib import models
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.testing.tiny_models import build_tiny_model
from dreambooth_lib.train.step import train_step
from dreambooth_lib.train.tracking import LossTracker

RESOLUTION = 64  # the tiny model's own


def check_host_syncs(device: str = "cuda") -> dict[str, str]:
    """{step name: "none" | the error naming the sync | "not checked on cpu"} for our full step and the packed
    LoRA step (3 subjects), each after 3 warm-up steps, on the tiny model."""
    dev = torch.device(models.resolve_device(device))
    cuda = dev.type == "cuda"
    found: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(build_tiny_model(Path(tmp) / "tiny"))
        uris = bench._write_images(Path(tmp) / "i", 2, RESOLUTION, seed=1)
        config = TrainConfig(resolution=RESOLUTION, device=str(dev))
        t = bench.ours_trainer(models.load_pipeline(tiny), [(uris, uris)], config, dev)
        step_p = bench._packed_step_fn(models.load_pipeline(tiny), 3, config.model_copy(update={"mode": "lora"}),
                                       dev, Path(tmp) / "p", RESOLUTION)  # fmt: skip
        tracker = LossTracker(1, dev)
        for s in range(3):
            tracker.add(train_step(t), s)
            step_p()
        bench._sync(dev)
        for name, fn in (
            ("train_step", lambda: tracker.add(train_step(t), 9)),
            ("packed_step", step_p),
        ):
            if not cuda:
                fn()
                found[name] = f"not checked on {dev.type}"
                continue
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                fn()
                found[name] = "none"
            except RuntimeError as err:
                found[name] = str(err)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return found
