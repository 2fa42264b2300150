"""Base-model families: what differs between Stable Diffusion 1.x/2.x and SDXL pipelines."""

from __future__ import annotations


def sd_pipeline_from_parts(unet, vae, text_encoder, tokenizer):
    """An SD-1.x pipeline around the given modules, with SD 1.x's training noise schedule and no safety checker."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(
        steps_offset=1,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
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


def is_sdxl(pipe) -> bool:
    """An SDXL-shaped pipeline: two text encoders, and a UNet conditioned on pooled text and size/crop ids."""
    return getattr(pipe, "text_encoder_2", None) is not None


def sdxl_pipeline_from_parts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
    """An SDXL pipeline around the given modules, with SDXL's training noise schedule and no watermarker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        steps_offset=1,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
