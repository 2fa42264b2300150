"""The model-family seam: one object per base-model family answers everything that differs between base models.

Training, prior sampling, evaluation and export never branch on the kind of model; they ask the pipeline's family:
which module denoises and which encode text, how prompts become the denoiser's conditioning (one or two
encoders, pooled embeddings, size ids), how a clean latent is noised at a drawn timestep and what the denoiser
must predict (epsilon, v, a flow velocity), which modules take LoRA adapters, and how a trained model is written
as a folder its diffusers pipeline class loads. Adding a family is a new subclass registered in
`families/__init__.py`; the training loop does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class PromptConditioning:
    """What the denoiser is conditioned on for P prompts, computed once by the frozen text encoders.

    `embeds` [P, L, D] are the sequence embeddings, `added` the family's extra per-prompt conditioning (SDXL: the
    pooled embedding and the size/crop ids; None where there is none), and `input_ids` each encoder's token ids
    [P, L] by encoder name, kept for training the text encoders (the differentiable path starts from them)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None
    input_ids: dict[str, torch.Tensor]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(embeds, added) of the prompts at `index`, one per row of a batch."""
        added = {k: v[index] for k, v in self.added.items()} if self.added is not None else None
        return self.embeds[index], added


class ModelFamily:
    """The defaults are those of latent diffusion with a UNet and a DDPM noise schedule (Stable Diffusion 1.x)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers class that loads the family's folders (model cards, export)
    denoiser_name: ClassVar[str] = "unet"  # the pipeline attribute of the module that denoises
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # the encoders `train_text_encoder` trains (a T5 stays frozen); None: all of them
    trainable_text_encoder_names: ClassVar[tuple[str, ...] | None] = None
    denoiser_lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        raise NotImplementedError

    # --- modules ------------------------------------------------------------------------------------------------

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe: Any) -> dict[str, torch.nn.Module]:
        """Every text encoder the pipeline has (an optional one may be None: left out)."""
        return {name: getattr(pipe, name) for name in self.text_encoder_names if getattr(pipe, name, None)}

    def trainable_text_encoders(self, pipe: Any) -> dict[str, torch.nn.Module]:
        names = self.trainable_text_encoder_names or self.text_encoder_names
        return {name: encoder for name, encoder in self.text_encoders(pipe).items() if name in names}

    def default_resolution(self, pipe: Any) -> int:
        """The side the base model was trained at (its pipeline's default height)."""
        return int(self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor)

    # --- conditioning -------------------------------------------------------------------------------------------

    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, resolution: int
    ) -> PromptConditioning:
        """The conditioning the pipeline itself gives its denoiser when sampling these prompts."""
        raise NotImplementedError

    def trainable_conditioning(
        self, encoders: dict[str, torch.nn.Module], cond: PromptConditioning
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(embeds, added) for all of `cond`'s prompts through `encoders` (being trained), differentiably: equal
        to `encode_prompts` for the same weights."""
        raise NotImplementedError

    # --- the training objective ---------------------------------------------------------------------------------

    def noise_scheduler(self, pipe: Any, config: Any) -> Any:
        """The forward (noising) process for training, from the pipeline's scheduler and the TrainConfig's
        options for it (a flow-matching family's timestep density)."""
        raise NotImplementedError

    def draw_timesteps(
        self, scheduler: Any, n: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        raise NotImplementedError

    def noised(
        self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the denoiser's input, its regression target, each row's loss weight or None) for clean `latents`
        noised with `noise` at `timesteps`."""
        raise NotImplementedError

    def predict(
        self,
        denoiser: Any,
        scheduler: Any,
        model_input: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- sampling -----------------------------------------------------------------------------------------------

    def sampler_name(self, sampler: str) -> str:
        """The sampler that `sampler` (a config's choice) samples with for this family: what a prior set's
        content key records."""
        return sampler

    def sampling_scheduler(self, pipe: Any, sampler: str) -> Any:
        raise NotImplementedError

    # --- export -------------------------------------------------------------------------------------------------

    def save_lora(
        self,
        folder: Path,
        denoiser: torch.nn.Module,
        text_encoders: dict[str, torch.nn.Module],
        metadata: dict[str, Any],
    ) -> None:
        """Write `pytorch_lora_weights.safetensors` as the family's pipeline class writes it (what its
        `load_lora_weights` reads): the denoiser's adapter and those of the trained text encoders."""
        from dreambooth_lib.models import lora

        lora.save_lora_weights(
            folder, self._pipeline_type(), self.denoiser_name, denoiser, text_encoders, metadata
        )

    def export_full(self, pipe: Any, folder: Path, trained: dict[str, torch.nn.Module]) -> None:
        """Write the whole pipeline, with the `trained` modules (by pipeline attribute name) in place, as
        safetensors: a folder `DiffusionPipeline.from_pretrained` loads."""
        for name, module in trained.items():
            setattr(pipe, name, module.to("cpu").eval())
        pipe.save_pretrained(str(folder), safe_serialization=True)

    def _pipeline_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)
