"""Stable Diffusion 3 / 3.5: a rectified-flow MMDiT over latents, conditioned on CLIP-L and CLIP-G (their
penultimate states side by side, zero-padded to T5's width, then T5's states after them in the sequence) and on
both CLIPs' pooled projections."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dreambooth_lib.models.families.base import PromptConditioning
from dreambooth_lib.models.families.flow_matching import JOINT_ATTENTION_LORA_TARGETS, FlowMatchingFamily
from dreambooth_lib.models.families.sd import token_ids


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5 (optional)
    trainable_text_encoder_names = ("text_encoder", "text_encoder_2")  # T5 stays frozen
    default_weighting_scheme = "logit_normal"  # as diffusers' SD3 DreamBooth script
    denoiser_lora_targets = JOINT_ATTENTION_LORA_TARGETS  # of every block (diffusers' SD3 LoRA script)

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, device, resolution):
        """The pipeline's own `encode_prompt` (its default T5 length), without classifier-free guidance."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, device=torch.device(device), do_classifier_free_guidance=False
        )
        return PromptConditioning(
            embeds=embeds.float(),
            added={"pooled_projections": pooled.float()},
            input_ids={
                "text_encoder": token_ids(pipe.tokenizer, prompts, device),
                "text_encoder_2": token_ids(pipe.tokenizer_2, prompts, device),
            },
        )

    def trainable_conditioning(self, encoders, cond):
        """`encode_prompt` through the trained CLIPs, differentiably; T5's part of the sequence stays cached."""
        clip_l = encoders["text_encoder"](cond.input_ids["text_encoder"], output_hidden_states=True)
        clip_g = encoders["text_encoder_2"](cond.input_ids["text_encoder_2"], output_hidden_states=True)
        clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, cond.embeds.shape[-1] - clip.shape[-1]))
        t5 = cond.embeds[:, clip.shape[1] :]
        pooled = torch.cat([clip_l[0], clip_g[0]], dim=-1)
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), {"pooled_projections": pooled}

    def predict(self, denoiser, scheduler, model_input, timesteps, embeds, added):
        return denoiser(
            hidden_states=model_input,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=added["pooled_projections"],
            return_dict=False,
        )[0]
