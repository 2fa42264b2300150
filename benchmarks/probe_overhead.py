"""What train.select costs: the same training run with and without probes, interleaved, on one model and device.

The figure the issue bounds is the probes' share of training time: (wall with probes - wall without) / wall
without. Each run is `train.run` itself (set-up, the steps, export), so the ratio includes everything probing
adds: loading the evaluators, moving the VAE and text encoders on and off the device, sampling, scoring. The
evaluators are tiny random DINO and CLIP models (nothing is downloaded); the published ViT-S/16 and CLIP B/32
add a few milliseconds per probe image on a GPU, a small fraction of sampling's cost.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_speed import BaseChoice, _sync, prepare_model
from dreambooth_lib.config import SelectConfig, TrainConfig


def bench_probe_overhead(
    choice: BaseChoice,
    *,
    steps: int = 40,
    mode: str = "lora",
    repeats: int = 2,
    select: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Median wall time of `repeats` interleaved runs with and without train.select (`select`: SelectConfig
    fields; default: its defaults, probing every steps // 4)."""
    from dreambooth_lib import train
    from dreambooth_lib.testing import evaluators

    dev = choice.torch_device()
    with tempfile.TemporaryDirectory(prefix="dreambooth-probe-bench-") as tmp:
        root = Path(tmp)
        bm = prepare_model(choice, root)
        if bm.uri is None:  # an in-memory model (the SD-1.5 shape): train.run loads from a folder
            bm.pipe.save_pretrained(root / "model", safe_serialization=True)
            bm.uri = str(root / "model")
        rule = SelectConfig(
            **{"every": max(steps // 4, 1), **(select or {})},
            dino_model=str(evaluators.build_tiny_dino(root / "dino")),
            clip_model=str(evaluators.build_tiny_clip(root / "clip")),
            lpips_weights=str(evaluators.build_tiny_lpips(root / "lpips.safetensors")),
        )
        base = TrainConfig(
            mode=mode, steps=steps, resolution=bm.resolution, checkpoint_every=0, log_every=max(steps // 4, 1),
            device=str(dev),
        )  # fmt: skip
        walls: dict[str, list[float]] = {"without": [], "with": []}
        probe_seconds, probes = [], 0
        for r in range(repeats):
            for label, config in (("without", base), ("with", base.model_copy(update={"select": rule}))):
                _sync(dev)
                started = time.perf_counter()
                result = train.run(
                    bm.uri, str(root / "instance"), str(root / "prior"), "sks", "dog", config,
                    str(root / f"out-{label}-{r}"),
                )  # fmt: skip
                _sync(dev)
                walls[label].append(time.perf_counter() - started)
                if result.selection is not None:
                    probe_seconds.append(result.selection["probe_seconds"])
                    probes = len(result.selection["probes"])
    without, with_probes = statistics.median(walls["without"]), statistics.median(walls["with"])
    probe_s = statistics.median(probe_seconds)
    return {
        "model": bm.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "mode": mode,
        "steps": steps,
        "resolution": bm.resolution,
        "rule": rule.model_dump(mode="json", exclude={"dino_model", "clip_model", "lpips_weights"}),
        "probes": probes,
        "probe_images": probes * (rule.prompts * rule.images_per_prompt + rule.class_images),
        "wall_without_s": without,
        "wall_with_s": with_probes,
        "probe_s": probe_s,
        "per_probe_s": probe_s / max(probes, 1),
        "overhead": (with_probes - without) / without,
        "probe_share_of_training": probe_s / max(without, 1e-9),
    }


def render_probe_table(r: dict[str, Any]) -> str:
    rule = r["rule"]
    return "\n".join(
        [
            f"# train.select probe overhead: {r['model']}, {r['device']}, {r['mode']}, {r['steps']} steps, "
            f"{r['resolution']} px",
            "",
            f"probe every {rule['every']} steps: {r['probes']} probes of {rule['prompts']} prompts x "
            f"{rule['images_per_prompt']} seeds + {rule['class_images']} class images, {rule['steps']} "
            f"sampler steps ({r['probe_images']} images in all)",
            "",
            "| run | wall s | probes s | per probe s | overhead |",
            "|---|---|---|---|---|",
            f"| without train.select | {r['wall_without_s']:.2f} | | | |",
            f"| with train.select | {r['wall_with_s']:.2f} | {r['probe_s']:.2f} | {r['per_probe_s']:.3f} | "
            f"{100 * r['overhead']:.1f} % |",
            "",
        ]
    )


def gpu_estimate(train_s_per_step: float, images_per_s: float, select: SelectConfig, steps: int) -> dict:
    """The probes' share of training time from measured GPU rates: a probe samples its images at
    `images_per_s` (scaled by sampler steps from a 25-step figure); scoring and moving modules are left out."""
    probes = steps // select.every + 1 + (steps % select.every != 0)
    images = select.prompts * select.images_per_prompt + select.class_images
    probe_s = images / images_per_s * select.sample_steps / 25
    return {"probes": probes, "per_probe_s": probe_s, "share": probes * probe_s / (steps * train_s_per_step)}
