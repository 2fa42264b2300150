"""Training-step benchmark: a diffusers-example-style DreamBooth step against ours, same model, device and process.

The reference is written the way diffusers' examples/dreambooth/train_dreambooth.py runs a step: fp16 autocast
with a GradScaler on CUDA (fp32 on CPU), the VAE and the text encoder run every step, plain AdamW, gradient
clipping at 1.0, the loss read back every step for the progress bar. (Its data is given to it as tensors already
on the device, which flatters it: the script decodes and transforms images in a DataLoader.) Ours is
`train.train_step` itself, on a Trainer from `train.setup_training`: the very code `train.run` runs.
"""

from __future__ import annotations

import copy
import gc
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dreambooth_lib import models
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.latents import load_image
from dreambooth_lib.loss import diffusion_target, dreambooth_loss
from dreambooth_lib.train import setup_training, train_step

IDENTIFIER, CLASS_NOUN = "sks", "dog"
NUM_IMAGES = 4  # subject images, and as many prior images


def build_sd15_shaped_pipeline(seed: int = 0):
    """An in-memory pipeline with Stable Diffusion 1.5's shapes and random weights (no download): 860M-parameter
    UNet, 84M VAE, 123M CLIP-L text encoder with the real vocabulary."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    vocab, _ = models.clip_bpe_vocab_and_merges()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(models.write_clip_tokenizer(tmp)))
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_images(folder: Path, n: int, resolution: int, seed: int) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uris = []
    for i in range(n):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        uris.append(str(folder / f"{i:02d}.png"))
    return uris


def reference_step_fn(
    pipe, instance: torch.Tensor, prior: torch.Tensor, config: TrainConfig, device: torch.device
):
    """A step as diffusers' train_dreambooth.py runs it (see the module docstring). Returns a step function."""
    from diffusers import DDPMScheduler

    cuda = device.type == "cuda"
    weight_dtype = torch.float16 if cuda else torch.float32  # the script's --mixed_precision fp16 on GPUs
    vae, text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
    vae.requires_grad_(False).to(device, dtype=weight_dtype)
    text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    unet.requires_grad_(True).to(device).train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bs = config.batch_size
    prompts = [f"a {IDENTIFIER} {CLASS_NOUN}"] * bs + [f"a {CLASS_NOUN}"] * bs
    input_ids = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    instance, prior = instance.to(device), prior.to(device)

    def step() -> float:
        pixel_values = torch.cat(
            [instance[torch.randint(len(instance), (bs,))], prior[torch.randint(len(prior), (bs,))]]
        )
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            latents = (
                vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
            )
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids)[0]
            pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            target = diffusion_target(scheduler, latents, noise, timesteps)
            loss = dreambooth_loss(pred[:bs], target[:bs], pred[bs:], target[bs:], config.prior_loss_weight)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()  # the script logs the loss every step

    return step


def _time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> tuple[float, int]:
    """(seconds per step, peak memory bytes) over `steps` steps after `warmup` untimed ones."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return (time.perf_counter() - started) / steps, peak


def bench_train(
    model: str | None = None,
    sd15_shape: bool = False,
    steps: int = 20,
    resolution: int | None = None,
    device: str = "auto",
    *,
    batch_size: int = 1,
    warmup: int = 2,
    mode: str = "full",
    compile: bool = False,
) -> dict[str, Any]:
    """Time the reference step and ours on the same model and device; print a table and return the figures.

    model: a base model URI (default: a fresh tiny model); sd15_shape: an SD-1.5-sized random model instead.
    resolution: None = the model's own (64 px tiny, 512 px SD-1.5). On CPU, peak memory is the process's peak
    RSS, which only grows: ours (measured second) includes the reference's.
    """
    from dreambooth_lib.sampling import default_resolution

    dev = torch.device(models.resolve_device(device))
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        if sd15_shape:
            model_name, base = "sd15-shaped (random weights)", build_sd15_shaped_pipeline()
        else:
            model_name = model or "tiny (random weights)"
            uri = model or str(models.build_tiny_model(Path(tmp) / "tiny"))
            base = models.load_pipeline(uri)
        resolution = resolution or default_resolution(base)
        instance_uris = _write_images(Path(tmp) / "instance", NUM_IMAGES, resolution, seed=1)
        prior_uris = _write_images(Path(tmp) / "prior", NUM_IMAGES, resolution, seed=2)
        config = TrainConfig(
            mode=mode,
            resolution=resolution,
            batch_size=batch_size,
            steps=steps,
            device=str(dev),
            compile=compile,
        )

        reference = reference_step_fn(
            copy.deepcopy(base),
            torch.stack([load_image(u, resolution) for u in instance_uris]),
            torch.stack([load_image(u, resolution) for u in prior_uris]),
            config,
            dev,
        )
        ref_s, ref_peak = _time_steps(reference, steps, warmup, dev)
        del reference
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        trainer = setup_training(
            base, instance_uris, prior_uris, f"a {IDENTIFIER} {CLASS_NOUN}", f"a {CLASS_NOUN}", config, dev
        )
        ours_s, ours_peak = _time_steps(lambda: train_step(trainer), steps, warmup, dev)

    ours_label = f"ours ({trainer.speed.precision}, cached latents, {'fused ' if trainer.speed.fused_adam else ''}AdamW)"
    ref_label = f"diffusers-style ({'fp16+GradScaler' if dev.type == 'cuda' else 'fp32'}, VAE+CLIP per step)"
    result = {
        "model": model_name,
        "device": str(dev),
        "resolution": resolution,
        "batch_size": batch_size,
        "mode": mode,
        "steps": steps,
        "reference_s_per_step": ref_s,
        "ours_s_per_step": ours_s,
        "speedup": ref_s / ours_s if ours_s > 0 else float("inf"),
        "reference_peak_memory_bytes": ref_peak,
        "ours_peak_memory_bytes": ours_peak,
        "peak_memory_kind": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "process peak RSS (cumulative)",
    }
    width = max(len(ours_label), len(ref_label))
    print(
        f"model: {model_name}   device: {dev}   {resolution} px   {batch_size}+{batch_size} images/step   {steps} steps"
    )
    print(f"{'loop':<{width}}  {'s/step':>8}  {'peak memory':>12}")
    print(f"{ref_label:<{width}}  {ref_s:8.4f}  {ref_peak / 2**30:9.2f} GiB")
    print(f"{ours_label:<{width}}  {ours_s:8.4f}  {ours_peak / 2**30:9.2f} GiB")
    print(
        f"speed-up (reference / ours): {result['speedup']:.2f}x   peak memory: {result['peak_memory_kind']}"
    )
    return result
