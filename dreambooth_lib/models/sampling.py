"""Seeded, batched sampling from a diffusers pipeline: the one sampler used by prior, generate and evaluate.

Each image has its own seed and its own torch.Generator, so its starting noise and every sampler draw depend only
on (prompt, seed, settings), not on which batch it landed in: a prior set can be extended, or a run resumed, and
give the same images. Not bit-identical ones across batch sizes: batched kernels sum in another order, so pixels
can differ by float rounding when the same seed is sampled in a batch of another size or with other prompts.
"""

from __future__ import annotations

import inspect
from typing import Any

SAMPLERS = ("dpm++", "ddim", "euler", "unipc", "pndm")


def make_scheduler(pipe: Any, sampler: str):
    """The scheduler `sampler` names, built from the pipeline's own scheduler config: the family decides
    (a DDPM family's samplers are DDPM solvers; a flow-matching family samples its flow)."""
    from dreambooth_lib.models.families import family_of

    return family_of(pipe).sampling_scheduler(pipe, sampler)


def compile_for_sampling(pipe: Any) -> Any:
    """Make `pipe` sample faster, in place: on CUDA the UNet and VAE in channels-last memory format (the layout
    cuDNN's tensor-core convolutions want), and the denoiser torch.compile'd. Compiling costs minutes up front (the
    first batch, and again for a new batch shape), so it pays off for long runs: a 1000-image prior set, or a
    large evaluation, not a 200-image set (see docs/performance.md). Batches keep one shape (prior.run draws full
    batches) so the UNet compiles once."""
    import torch

    from dreambooth_lib.models import compile_module, family_of

    name = family_of(pipe).denoiser_name
    if pipe.device.type == "cuda":
        getattr(pipe, name).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    setattr(pipe, name, compile_module(getattr(pipe, name)))
    return pipe


def default_guidance_scale(pipe: Any) -> float:
    """The pipeline's own default classifier-free guidance (7.5 for Stable Diffusion 1.x)."""
    param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return float(param.default) if param is not None and param.default is not inspect.Parameter.empty else 7.5


def default_resolution(pipe: Any) -> int:
    from dreambooth_lib.models.families import family_of

    return family_of(pipe).default_resolution(pipe)


def image_seed(base_seed: int, index: int) -> int:
    """The seed of image `index` of a seeded set: stable, distinct, within torch's range."""
    return (base_seed * 1_000_003 + index) % (2**63 - 1)


def sample_images(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 25,
    sampler: str = "dpm++",
    guidance_scale: float | None = None,
    resolution: int | None = None,
    batch_size: int = 4,
    progress: Any = None,
) -> list:
    """One PIL image per (prompt, seed) pair, in order, generated `batch_size` at a time."""
    import torch

    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    pipe.scheduler = make_scheduler(pipe, sampler)
    guidance = default_guidance_scale(pipe) if guidance_scale is None else guidance_scale
    size = resolution or default_resolution(pipe)
    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    images: list = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        generators = [
            torch.Generator(device=gen_device).manual_seed(s) for s in seeds[start : start + batch_size]
        ]
        with torch.inference_mode():
            out = pipe(
                batch_prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=size,
                width=size,
                generator=generators,
            )
        images.extend(out.images)
        if progress is not None:
            progress.update(len(batch_prompts))
    return images
