"""Synthetic data for demos and tests (no downloads): a subject, a coloured square on a lightly noisy grey
background; and a stand-in model folder for tests that move models without loading them."""

from __future__ import annotations

import json
from pathlib import Path


def make_subject_images(
    out_dir: str | Path, n: int = 4, size: int = 288, color=(220, 30, 30), seed: int = 0
) -> Path:
    """Write `n` PNG photos of one square subject at shifting positions and sizes, deterministic in `seed`."""
    import numpy as np
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size, 3), 128, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
        side = size // 2 + int(rng.integers(-size // 10, size // 10))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        img[y0 : y0 + side, x0 : x0 + side] = color
        Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(out / f"{i:02d}.png")
    return out


def fake_model_folder(folder: str | Path, tag: str = "0", lora: bool = False) -> str:
    """A few-byte stand-in for a trained model folder (a diffusers pipeline, or a LoRA folder) for registry and
    storage tests, which move folders and never load them; `tag` makes each one's bytes unique."""
    if lora:
        files = {
            "pytorch_lora_weights.safetensors": f"lora-weights-{tag}",
            "dreambooth_lora.json": json.dumps({"base_model": "base", "rank": 4, "tag": tag}),
        }
    else:
        files = {
            "model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline", "tag": tag}),
            "unet/diffusion_pytorch_model.safetensors": f"unet-weights-{tag}",
        }
    for rel, text in files.items():
        (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / rel).write_text(text)
    return str(folder)


def register_fake(registry, model_dir: str, **overrides):
    """`registry.register` of `model_dir` with stand-in metadata (subject "dog", identifier "zwx", base model
    "org/tiny-sd", no metrics, no gate, empty lineage); `overrides` replace any of it."""
    fields = dict(
        subject="dog",
        model_dir=model_dir,
        identifier="zwx",
        class_noun="dog",
        base_model="org/tiny-sd",
        base_model_digest="digest-a",
        metrics=None,
        gate=None,
        lineage={},
    )
    return registry.register(**{**fields, **overrides})
