"""FLUX.1 (dev, schnell): a rectified-flow transformer over 2×2-packed latents, conditioned on T5's sequence
embeddings and CLIP's pooled embedding; dev also on a distilled-guidance value."""

from __future__ import annotations

from typing import Any

import torch

from dreambooth_lib.models.families.base import PromptConditioning
from dreambooth_lib.models.families.flow_matching import JOINT_ATTENTION_LORA_TARGETS, FlowMatchingFamily
from dreambooth_lib.models.families.sd import token_ids


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2·w/2, 4c): each 2×2 patch of latents one token, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`, for a (height, width) latent."""
    b, _, packed = tokens.shape
    c = packed // 4
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[(h/2)·(w/2), 3] positions (0, row, column) of the packed tokens, for the rotary embedding."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class Flux(FlowMatchingFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")  # CLIP (pooled), T5 (sequence)
    trainable_text_encoder_names = ("text_encoder",)  # T5 stays frozen
    default_weighting_scheme = "none"  # uniform t, as diffusers' FLUX DreamBooth scripts
    # attention of both block kinds, and the double-stream blocks' feed-forward paths (diffusers' FLUX LoRA script)
    denoiser_lora_targets = (
        *JOINT_ATTENTION_LORA_TARGETS,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, device, resolution):
        """The pipeline's own `encode_prompt`: T5's hidden states (padded to its max_sequence_length) and CLIP's
        pooled output."""
        embeds, pooled, _ = pipe.encode_prompt(prompts, device=torch.device(device), num_images_per_prompt=1)
        return PromptConditioning(
            embeds=embeds.float(),
            added={"pooled_projections": pooled.float()},
            input_ids={"text_encoder": token_ids(pipe.tokenizer, prompts, device)},
        )

    def trainable_conditioning(self, encoders, cond):
        """CLIP's pooled output through the trained CLIP (as `encode_prompt` computes it); T5's stays cached."""
        pooled = encoders["text_encoder"](
            cond.input_ids["text_encoder"], output_hidden_states=False
        ).pooler_output
        return cond.embeds, {"pooled_projections": pooled}

    def noise_scheduler(self, pipe, config):
        schedule = super().noise_scheduler(pipe, config)
        # dev was distilled to follow a guidance input; schnell has none (the transformer refuses one)
        schedule.guidance = config.guidance_scale if pipe.transformer.config.guidance_embeds else None
        return schedule

    def predict(self, denoiser, scheduler, model_input, timesteps, embeds, added):
        b, _, h, w = model_input.shape
        guidance = None
        if scheduler.guidance is not None:
            guidance = torch.full(
                (b,), scheduler.guidance, device=model_input.device, dtype=model_input.dtype
            )
        tokens = denoiser(
            hidden_states=pack_latents(model_input),
            timestep=timesteps / scheduler.num_train_timesteps,  # FLUX takes t in [0, 1]
            guidance=guidance,
            pooled_projections=added["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype),
            img_ids=latent_image_ids(h, w, model_input.device, model_input.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, h, w)
