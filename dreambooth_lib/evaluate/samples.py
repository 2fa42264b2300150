"""The images an evaluation scores: a model loaded, every prompt sampled at fixed seeds, the model freed, and
the images saved as `images/<folder>/NN.png`.

Image j of every prompt is sampled from seed `image_seed(config.seed, j)`, so prompts and models (the fine-tuned
one and its base) are compared on the same noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from dreambooth_lib import storage
from dreambooth_lib.config import EvalConfig, SelectConfig
from dreambooth_lib.images import png_bytes


@dataclass
class ModelImages:
    """What one model sampled for the evaluation."""

    groups: list[list[Image.Image]]  # images_per_prompt images of each prompt, in the prompts' order
    class_images: list[Image.Image]  # pres_images images of "a [class noun]" (PRES); empty when not asked for
    resolution: int


def load_for_sampling(
    uri: str, device: str, allow_pickle: bool, base_model: str | None, compile: bool
) -> Any:
    from dreambooth_lib.models import load_pipeline, resolve_dtype
    from dreambooth_lib.models.sampling import compile_for_sampling

    dtype = resolve_dtype("auto", device)
    pipe = load_pipeline(
        uri, allow_pickle=allow_pickle, torch_dtype=dtype, device=device, base_model=base_model
    )
    return compile_for_sampling(pipe) if compile else pipe


def release_pipeline(pipe: Any) -> None:
    """Free a pipeline's weights now, even though the caller still holds the pipeline object: its modules are
    dropped from it, then collected, and the CUDA allocator's cache is returned. Without this a second pipeline
    (the base model, with gate.compare_to_base) is loaded while the first still fills the GPU."""
    import gc

    import torch

    for name in list(pipe.components):
        setattr(pipe, name, None)
    gc.collect()  # a reference cycle through the modules would otherwise hold them until a later collection
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_prompts(
    pipe: Any, prompts: list[str], n: int, config: EvalConfig | SelectConfig, resolution: int
) -> list[list[Image.Image]]:
    """n images per prompt, image j of every prompt from seed image_seed(config.seed, j), batched across prompts
    (`config`: the evaluation's settings, or train.select's for its probes)."""
    if n == 0:
        return [[] for _ in prompts]
    from dreambooth_lib.models.sampling import image_seed, sample_images

    flat = [p for p in prompts for _ in range(n)]
    seeds = [image_seed(config.seed, j) for _ in prompts for j in range(n)]
    images = sample_images(
        pipe,
        flat,
        seeds,
        steps=config.steps,
        sampler=config.sampler,
        guidance_scale=config.guidance_scale,
        resolution=resolution,
        batch_size=config.batch_size,
    )
    return [images[i * n : (i + 1) * n] for i in range(len(prompts))]


def sample_model(
    uri: str,
    prompts: list[str],
    config: EvalConfig,
    device: str,
    *,
    allow_pickle: bool,
    base_model: str | None = None,
    class_prompt: str | None = None,
    resolution: int | None = None,
) -> ModelImages:
    """Load the model, sample every prompt (and `class_prompt` config.pres_images times, for PRES), and free the
    model before returning. resolution: config.resolution, else the model's own."""
    from dreambooth_lib.models.sampling import default_resolution

    pipe = load_for_sampling(uri, device, allow_pickle, base_model, config.compile)
    try:
        resolution = resolution or config.resolution or default_resolution(pipe)
        groups = sample_prompts(pipe, prompts, config.images_per_prompt, config, resolution)
        class_images = (
            sample_prompts(pipe, [class_prompt], config.pres_images, config, resolution)[0]
            if class_prompt is not None and config.pres_images
            else []
        )
    finally:
        release_pipeline(pipe)
    return ModelImages(groups=groups, class_images=class_images, resolution=resolution)


def save_images(out: str, folder: str, images: list[Image.Image]) -> list[str]:
    """Write images as out/images/<folder>/NN.png; returns their paths relative to `out`."""
    rel = []
    for j, img in enumerate(images):
        path = f"images/{folder}/{j:02d}.png"
        storage.write_bytes(storage.join(out, *path.split("/")), png_bytes(img))
        rel.append(path)
    return rel


def read_image(uri: str) -> Image.Image:
    img = Image.open(io.BytesIO(storage.read_bytes(uri)))
    img.load()
    return img.convert("RGB")
