"""The FLUX.1 LoRA step: what a step of `train.run` costs on a FLUX.1-dev-shaped transformer (random weights).

`python -m benchmarks flux --flux-shape` builds, in memory and on the device, a transformer with FLUX.1-dev's
shapes (19 double-stream and 38 single-stream blocks, 24 heads of 128, 4096-wide T5 context, 768-wide CLIP pooled,
guidance embedding: ~11.9 B parameters), one-layer text encoders of the right widths (their embeddings are
computed once before training, so their depth does not change a step) and a 16-channel VAE with 8x downsampling;
then it times our LoRA step with the frozen base in bf16 (with and without gradient checkpointing) and packed
K-subject steps, and reports peak GPU memory. Without --flux-shape (the CPU smoke run of scripts/gpu_bench.sh) the
same rows run on a tiny FLUX.1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_speed import _reset_peak, _write_images, clip_l_config, ours_trainer, time_row
from dreambooth_lib import models
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.train.step import train_step


def build_flux_shaped_pipeline(device: torch.device, seed: int = 0):
    """FLUX.1-dev's transformer (bf16, random) and scheduler, with shallow encoders and VAE of its widths."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dreambooth_lib.testing.tiny_models import _tiny_t5, write_tiny_t5_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        # diffusers' defaults are FLUX.1-dev's transformer (19 double and 38 single blocks, 24 heads of 128, the
        # widths of T5-XXL and CLIP-L); dev embeds the guidance scale, which schnell does not
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), latent_channels=16, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )  # fmt: skip
    clip = CLIPTextModel(clip_l_config(num_hidden_layers=1))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(models.write_clip_tokenizer(Path(tmp) / "clip")))
        t5_tokenizer = write_tiny_t5_tokenizer(Path(tmp) / "t5")
    t5 = _tiny_t5(len(t5_tokenizer), d_model=4096, seed=seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)  # fmt: skip


def bench_flux(
    *,
    flux_shape: bool = False,
    device: str = "auto",
    resolution: int | None = None,
    steps: int = 10,
    warmup: int = 2,
    ks: tuple[int, ...] = (1, 4),
    lora_rank: int = 4,
) -> list[dict[str, Any]]:
    """Rows of s/step, subjects·steps/s and peak memory: our FLUX.1 LoRA step (bf16 frozen base, fp32 adapters,
    1 subject + 1 prior image), with gradient checkpointing, and K subjects packed in one step."""
    from dreambooth_lib.testing.tiny_models import build_tiny_flux_model

    dev = torch.device(models.resolve_device(device))
    resolution = resolution or (512 if flux_shape else 32)
    precision = "bf16" if dev.type == "cuda" or flux_shape else "fp32"  # a CPU smoke run: no autocast
    rows = []
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-flux-") as tmp:
        folder = Path(tmp)
        prior = _write_images(folder / "prior", 4, resolution, seed=2)
        subjects = [_write_images(folder / f"s{i}", 4, resolution, seed=100 + i) for i in range(max(ks))]
        tiny = None if flux_shape else str(build_tiny_flux_model(folder / "tiny"))

        def pipe():
            return build_flux_shaped_pipeline(dev) if flux_shape else models.load_pipeline(tiny)

        base = TrainConfig(mode="lora", lora_rank=lora_rank, resolution=resolution, steps=steps, device=str(dev),
                           mixed_precision="bf16" if precision == "bf16" else "no",
                           base_precision="bf16" if precision == "bf16" else "fp32")  # fmt: skip
        name = "FLUX.1-dev-shaped" if flux_shape else "tiny FLUX.1"
        variants = [(f"ours {name} LoRA r{lora_rank} ({precision}, 1+1 images)", base, 1)]
        variants.append(
            ("  + gradient checkpointing", base.model_copy(update={"gradient_checkpointing": True}), 1)
        )
        # a full-size pack checkpoints its activations: K subjects' rows at 512 px exceed 80 GB otherwise
        packed = base.model_copy(update={"gradient_checkpointing": flux_shape})
        variants += [(f"packed {name} LoRA, K={k} subjects", packed, k) for k in ks if k > 1]
        for label, config, k in variants:
            _reset_peak(dev)
            trainer = ours_trainer(pipe(), [(subjects[i], prior) for i in range(k)], config, dev)
            rows.append({**time_row(label, lambda t=trainer: train_step(t), steps, warmup, dev, k),
                         "resolution": resolution})  # fmt: skip
            del trainer
    return rows


def render_flux_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| | s/step | subjects·steps/s | peak memory GiB |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['s_per_step']:.4f} | {r['subject_steps_per_s']:.2f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"
