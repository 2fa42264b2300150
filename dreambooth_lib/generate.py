"""Render images from a model (a diffusers folder, or a base model + our LoRA) for a list of final prompts.

Writes `out/<prompt-slug>/NN.png` and `out/generate.json`. Image j of every prompt uses the seed
`image_seed(seed, j)`: the paper compares prompts at fixed seeds, so the same j across prompts starts from the
same noise, and a rerun with the same seed gives the same pixels.
"""

from __future__ import annotations

import re
import sys
import time

from pydantic import BaseModel

from dreambooth_lib import models, storage
from dreambooth_lib.artifacts import GENERATE_RECORD_NAME as RESULT_NAME
from dreambooth_lib.errors import ConfigError
from dreambooth_lib.images import png_bytes
from dreambooth_lib.models import sampling

SLUG_MAX_CHARS = 60


class GeneratedImage(BaseModel):
    prompt: str
    index: int  # j: the image's place among its prompt's images
    seed: int
    uri: str


class GenerateResult(BaseModel):
    """What was rendered, with every image's prompt and seed; also written as out/generate.json."""

    model: str
    base_model: str | None  # the base a LoRA was applied to, when overridden
    out: str
    prompts: list[str]
    slugs: list[str]  # the folder of each prompt, in the order of `prompts`
    n: int
    seed: int
    steps: int
    sampler: str
    guidance_scale: float  # the scale used (the pipeline default when none was given)
    resolution: int
    images: list[GeneratedImage]
    wall_time_s: float


def slugify(prompt: str) -> str:
    """A folder name for a prompt: lowercase [a-z0-9-], at most 60 characters, never empty. The one rule for
    prompt folders: evaluate writes its images under the same names."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:SLUG_MAX_CHARS].rstrip("-") or "prompt"


def unique_slugs(prompts: list[str]) -> list[str]:
    """slugify each prompt, suffixing -2, -3, ... where two prompts would share a folder."""
    used: set[str] = set()
    out = []
    for p in prompts:
        base = slugify(p)
        slug, k = base, 1
        while slug in used:
            k += 1
            suffix = f"-{k}"
            slug = base[: SLUG_MAX_CHARS - len(suffix)].rstrip("-") + suffix
        used.add(slug)
        out.append(slug)
    return out


def run(
    model: str,
    prompts: list[str],
    out: str,
    n: int = 4,
    seed: int = 0,
    steps: int = 25,
    sampler: str = "dpm++",
    guidance_scale: float | None = None,
    resolution: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    allow_pickle: bool = False,
    base_model: str | None = None,
) -> GenerateResult:
    """Render `n` images of each prompt (final strings, already formatted) into out/<slug>/NN.png."""
    t0 = time.perf_counter()
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("generate: no prompts given; pass at least one --prompt")
    if n < 1:
        raise ConfigError(f"generate: n (images per prompt) is {n}; it must be at least 1")
    if batch_size < 1:
        raise ConfigError(f"generate: batch_size is {batch_size}; it must be at least 1")
    if sampler not in sampling.SAMPLERS:
        raise ConfigError(
            f"generate: sampler {sampler!r} is unknown; use one of {', '.join(sampling.SAMPLERS)}"
        )
    if steps < 1:
        raise ConfigError(f"generate: steps is {steps}; it must be at least 1")

    from tqdm import tqdm

    dev = models.resolve_device(device)
    dtype = models.resolve_dtype("auto", dev)
    pipe = models.load_pipeline(
        model, allow_pickle=allow_pickle, torch_dtype=dtype, device=dev, base_model=base_model
    )
    guidance = sampling.default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
    size = int(resolution or sampling.default_resolution(pipe))

    slugs = unique_slugs(prompts)
    width = max(2, len(str(n - 1)))
    jobs = [  # (prompt, slug, j, seed): image j of every prompt shares a seed
        (p, slug, j, sampling.image_seed(seed, j))
        for p, slug in zip(prompts, slugs, strict=True)
        for j in range(n)
    ]
    records: list[GeneratedImage] = []
    with tqdm(total=len(jobs), desc="generate", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            images = sampling.sample_images(
                pipe,
                [p for p, *_ in batch],
                [s for *_, s in batch],
                steps=steps,
                sampler=sampler,
                guidance_scale=guidance,
                resolution=size,
                batch_size=batch_size,
            )
            for (p, slug, j, s), image in zip(batch, images, strict=True):
                uri = storage.join(out, slug, f"{j:0{width}d}.png")
                storage.write_bytes(uri, png_bytes(image))
                records.append(GeneratedImage(prompt=p, index=j, seed=s, uri=uri))
            bar.update(len(batch))

    result = GenerateResult(
        model=model,
        base_model=base_model,
        out=str(out),
        prompts=prompts,
        slugs=slugs,
        n=n,
        seed=seed,
        steps=steps,
        sampler=sampler,
        guidance_scale=guidance,
        resolution=size,
        images=records,
        wall_time_s=round(time.perf_counter() - t0, 3),
    )
    storage.write_json(storage.join(out, RESULT_NAME), result.model_dump(mode="json"))
    return result
