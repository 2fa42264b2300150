"""SDXL: the UNet is conditioned on two CLIP encoders' states (concatenated), the second encoder's pooled
embedding and the image's size/crop ids (`added_cond_kwargs`); noise and targets are Stable Diffusion's."""

from __future__ import annotations

from typing import Any

import torch

from dreambooth_lib.models.families.base import PromptConditioning
from dreambooth_lib.models.families.sd import SD_TRAINING_SCHEDULE, StableDiffusion, token_ids


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is not None

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, device, resolution):
        """The pipeline's own `encode_prompt` (both encoders' penultimate states concatenated, the second's
        pooled projection) and the size/crop ids of a square, uncropped `resolution` image: (R, R, 0, 0, R, R)."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = [resolution, resolution, 0, 0, resolution, resolution]
        time_ids = torch.tensor([size] * len(prompts), device=device, dtype=torch.float32)
        return PromptConditioning(
            embeds=embeds.float(),
            added={"text_embeds": pooled.float(), "time_ids": time_ids},
            input_ids={
                "text_encoder": token_ids(pipe.tokenizer, prompts, device),
                "text_encoder_2": token_ids(pipe.tokenizer_2, prompts, device),
            },
        )

    def trainable_conditioning(self, encoders, cond):
        """What `encode_prompt` computes, differentiably: each encoder's penultimate hidden states,
        concatenated, and the second encoder's projected pooled output as the pooled embedding."""
        first = encoders["text_encoder"](cond.input_ids["text_encoder"], output_hidden_states=True)
        second = encoders["text_encoder_2"](cond.input_ids["text_encoder_2"], output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds, {**cond.added, "text_embeds": second[0]}

    @staticmethod
    def pipeline_from_parts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
        """A pipeline around the given modules, with SDXL's training noise schedule and no watermarker."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        scheduler = EulerDiscreteScheduler(**SD_TRAINING_SCHEDULE, timestep_spacing="leading")
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
