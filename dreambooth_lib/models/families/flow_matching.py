"""Rectified-flow transformers (SD3, FLUX.1): the training objective they share.

A clean latent x0 is moved toward noise ε along a straight line, x_t = (1 − σ)·x0 + σ·ε, and the transformer
predicts the velocity ε − x0. σ comes from the base's own FlowMatchEulerDiscreteScheduler (SD3 trains on σ
shifted by its `shift`; FLUX.1-dev's scheduler shifts at sampling time only, so it trains on unshifted σ), at a
timestep index drawn from a density u (`weighting_scheme`): uniform ("none", FLUX's default), "logit_normal"
(sigmoid of a normal: SD3's default, most mass at middle noise levels) or "mode"; "sigma_sqrt" and "cosmap" keep u
uniform and weight each row's loss instead. The math is that of diffusers' `training_utils`
(`compute_density_for_timestep_sampling`, `compute_loss_weighting_for_sd3`) and its DreamBooth scripts, written
here so the draws come from the training generator like every other draw of a step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dreambooth_lib.errors import ConfigError
from dreambooth_lib.models.families.base import ModelFamily

log = logging.getLogger(__name__)


@dataclass
class FlowMatchingSchedule:
    """The forward process a flow-matching model is trained on: its N timesteps (σ·N, descending) and the
    timestep density."""

    timesteps: torch.Tensor  # [N]: the values the transformer is told; σ = timestep / N
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    guidance: float | None = (
        None  # FLUX.1-dev's distilled-guidance input while training; None where there is none
    )

    @property
    def num_train_timesteps(self) -> int:
        return self.timesteps.shape[0]

    def on(self, device: torch.device) -> torch.Tensor:
        if self.timesteps.device != device:  # moved once: a copy per step would stall the GPU
            self.timesteps = self.timesteps.to(device)
        return self.timesteps


def timestep_density(schedule: FlowMatchingSchedule, n: int, generator, device) -> torch.Tensor:
    """u in [0, 1) for n rows, drawn from `generator`."""
    if schedule.weighting_scheme == "logit_normal":
        normal = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(schedule.logit_mean + schedule.logit_std * normal)
    u = torch.rand(n, generator=generator, device=device)
    if schedule.weighting_scheme == "mode":
        return 1 - u - schedule.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Each row's loss weight w(σ): σ⁻² for sigma_sqrt, the cosine map's 2/(π(1 − 2σ + 2σ²)); None (all 1)
    otherwise."""
    if weighting_scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return None


# the joint attention of an MMDiT block: the image stream's projections and the text stream's (add_*)
JOINT_ATTENTION_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


class FlowMatchingFamily(ModelFamily):
    """A transformer over VAE latents trained by flow matching; subclasses say how it is conditioned."""

    denoiser_name = "transformer"
    default_weighting_scheme: ClassVar[str]

    def sampler_name(self, sampler: str) -> str:
        return "flow-euler"

    def sampling_scheduler(self, pipe: Any, sampler: str) -> Any:
        """The base's own flow-matching Euler scheduler, whatever `sampler` says: the DDPM solvers the other
        names select would integrate the wrong process (and silently)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if sampler != "euler":
            log.info(
                "sampler %r: a flow-matching model samples with its own flow-matching Euler scheduler",
                sampler,
            )
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def default_resolution(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def noise_scheduler(self, pipe: Any, config: Any) -> FlowMatchingSchedule:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # a fresh copy: sampling with the pipeline shortens its scheduler's timesteps in place
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        n = len(scheduler.timesteps)
        if not torch.allclose(scheduler.sigmas[:n], scheduler.timesteps / n):  # what `noised` relies on
            raise ConfigError(f"{type(scheduler).__name__}: its training sigmas are not timesteps / {n}")
        return FlowMatchingSchedule(
            timesteps=scheduler.timesteps.float(),
            weighting_scheme=config.weighting_scheme or self.default_weighting_scheme,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
        )

    def draw_timesteps(self, scheduler: FlowMatchingSchedule, n, generator, device):
        """Timesteps at indices drawn from the density (u·N, as diffusers' scripts index their scheduler copy)."""
        u = timestep_density(scheduler, n, generator, device)
        index = (u * scheduler.num_train_timesteps).long().clamp(max=scheduler.num_train_timesteps - 1)
        return scheduler.on(device)[index]

    def noised(self, scheduler: FlowMatchingSchedule, latents, noise, timesteps):
        """x_t = (1 − σ)·x0 + σ·ε, the target ε − x0, and the scheme's weights."""
        sigmas = timesteps / scheduler.num_train_timesteps
        sigma = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        return noisy, noise - latents, loss_weights(scheduler.weighting_scheme, sigmas)
