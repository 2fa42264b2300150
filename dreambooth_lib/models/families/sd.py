"""Stable Diffusion 1.x / 2.x: a UNet over VAE latents, one CLIP text encoder, a DDPM noise schedule whose model
predicts the noise (epsilon) or the velocity (v, SD 2.x at 768 px)."""

from __future__ import annotations

from typing import Any

import torch

from dreambooth_lib.errors import ConfigError, TrainingError
from dreambooth_lib.models.families.base import ModelFamily, PromptConditioning


def token_ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Token ids [P, L] padded to the tokenizer's max length, as the pipelines tokenize."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


# The noise schedule Stable Diffusion 1.x and SDXL were trained with (their tiny builders' schedulers use it)
SD_TRAINING_SCHEDULE = dict(
    steps_offset=1,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
)


def diffusion_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What a DDPM model must predict for these noised latents, per the scheduler's `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(
        f"scheduler prediction_type {kind!r} is not supported for training; the base model's "
        "scheduler/scheduler_config.json must say 'epsilon' or 'v_prediction'"
    )


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is None

    @torch.no_grad()
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, resolution: int
    ) -> PromptConditioning:
        """The text encoder's last hidden states, as StableDiffusionPipeline conditions its UNet."""
        input_ids = token_ids(pipe.tokenizer, prompts, device)
        embeds = pipe.text_encoder(input_ids)[0].float()
        return PromptConditioning(embeds=embeds, added=None, input_ids={"text_encoder": input_ids})

    def trainable_conditioning(self, encoders, cond):
        return encoders["text_encoder"](cond.input_ids["text_encoder"])[0], cond.added

    def noise_scheduler(self, pipe: Any, config: Any) -> Any:
        from diffusers import DDPMScheduler

        if config.weighting_scheme is not None:
            raise ConfigError(
                f"train.weighting_scheme {config.weighting_scheme!r} weights the timesteps of flow-matching models "
                f"(SD3, FLUX.1); a {self.pipeline_class} trains on DDPM's uniform timesteps: leave it unset"
            )
        return DDPMScheduler.from_config(pipe.scheduler.config)

    def draw_timesteps(self, scheduler, n, generator, device):
        """Uniform over the schedule's steps (the simplified objective of DDPM)."""
        return torch.randint(
            0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device
        )

    def noised(self, scheduler, latents, noise, timesteps):
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return noisy, diffusion_target(scheduler, latents, noise, timesteps), None

    def predict(self, denoiser, scheduler, model_input, timesteps, embeds, added):
        extra = {"added_cond_kwargs": added} if added is not None else {}
        return denoiser(model_input, timesteps, embeds, return_dict=False, **extra)[0]

    def sampling_scheduler(self, pipe: Any, sampler: str) -> Any:
        """A DDPM solver of the named kind, from the pipeline's scheduler config (betas, prediction type)."""
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerDiscreteScheduler,
            PNDMScheduler,
            UniPCMultistepScheduler,
        )

        classes = {
            "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M): the fast multistep default, good at 20-25 steps
            "ddim": DDIMScheduler,
            "euler": EulerDiscreteScheduler,
            "unipc": UniPCMultistepScheduler,
            "pndm": PNDMScheduler,
        }
        if sampler not in classes:
            raise ConfigError(f"sampler {sampler!r} is unknown; use one of {', '.join(classes)}")
        return classes[sampler].from_config(pipe.scheduler.config)

    @staticmethod
    def pipeline_from_parts(unet, vae, text_encoder, tokenizer):
        """A pipeline around the given modules, with SD 1.x's training noise schedule and no safety checker."""
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        scheduler = DDPMScheduler(**SD_TRAINING_SCHEDULE, clip_sample=False)
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
