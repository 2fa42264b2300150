"""The trainer: everything a training step touches, set up once for one subject or K packed subjects.

Set-up encodes the data once (every subject's images through the VAE, every prompt through the frozen text
encoders; then those leave the device), makes the trainable parameters (the whole denoiser, or LoRA adapters; the
text encoders' when asked; K adapters grouped into one layer for a pack) and the optimizer. What differs between
base models is asked of the pipeline's family, never branched on here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from dreambooth_lib import models
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.models import ModelFamily, PromptConditioning, lora, quantization
from dreambooth_lib.train.data import LatentCache, TrainingData, encode_images
from dreambooth_lib.train.grouped_lora import GroupedAdapters, clip_grad_norm_per_adapter
from dreambooth_lib.train.speed import SpeedOptions, make_optimizer, seed_everything, speed_options
from dreambooth_lib.train.subjects import TrainSubject

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    family: ModelFamily
    denoiser: torch.nn.Module  # the module whose weights are saved
    denoiser_forward: Any  # the same module, maybe torch.compile'd
    trained_encoders: dict[str, torch.nn.Module]  # by pipeline attribute; empty: their embeddings are cached
    noise_scheduler: Any
    data: list[TrainingData]  # per subject
    prompts: PromptConditioning  # 2K prompts: subject k's instance prompt at row 2k, its class prompt at 2k+1
    generators: list[torch.Generator]  # per subject: its noise, timesteps and latent draws, seeded alike
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    named_trainable: dict[str, torch.nn.Parameter]  # "<pipeline attribute>.<parameter name>" -> parameter
    speed: SpeedOptions
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    batch_size: int
    prior_loss_weight: float  # 0 when there is no prior term
    prior_mode: str  # the prior term's target: "sampled" (prior images) or "model_output" (the frozen base's)
    max_grad_norm: float | None
    grouped: GroupedAdapters | None  # a pack's K adapters; None for one subject
    frozen_denoiser: torch.nn.Module | None  # a full fine-tune's untouched copy, for model-output targets
    active: list[int] = field(default_factory=list)  # subjects still in the batch
    _layout: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def num_subjects(self) -> int:
        return len(self.data)

    def layout(self) -> tuple[torch.Tensor, ...]:
        """(adapter index, prompt row) of each batch row, the active subjects and the prior rows, as device tensors
        made once per active set: a host-to-device copy every step would stall the GPU. A subject's rows: its
        `batch_size` instance rows, then (with a prior term) as many prior rows."""
        key = tuple(self.active)
        if key not in self._layout:
            bs, prior = self.batch_size, self.prior_loss_weight > 0
            adapter, prompt, prior_rows = [], [], []
            for k in key:
                prior_rows += [len(adapter) + bs + i for i in range(bs)] if prior else []
                adapter += [k] * bs * (2 if prior else 1)
                prompt += [2 * k] * bs + ([2 * k + 1] * bs if prior else [])
            dev = self.speed.device
            self._layout[key] = tuple(torch.tensor(v, device=dev) for v in (adapter, prompt, key, prior_rows))
        return self._layout[key]

    @contextmanager
    def frozen_base(self) -> Iterator:
        """The denoiser as the frozen base model, for the model-output prior's targets: LoRA adapters switched off,
        or a full fine-tune's untouched copy."""
        if self.frozen_denoiser is not None:
            yield self.frozen_denoiser
            return
        if self.grouped is not None:
            self.grouped.router.enabled = False
        else:
            self.denoiser.disable_adapters()
        try:
            yield self.denoiser_forward
        finally:
            if self.grouped is not None:
                self.grouped.router.enabled = True
            else:
                self.denoiser.enable_adapters()

    def clip_gradients(self) -> None:
        """Each subject's gradients clipped as its single run clips them (a global norm per model)."""
        if self.max_grad_norm is None:
            return
        if self.grouped is not None:
            clip_grad_norm_per_adapter(self.params, self.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)


def _encode_images(vae, subjects_images, config: TrainConfig, device) -> list[TrainingData]:
    caches: dict[tuple[str, ...], LatentCache] = {}  # subjects of one class share their prior set's latents

    def encoded(uris: list[str]) -> LatentCache:
        if tuple(uris) not in caches:
            caches[tuple(uris)] = encode_images(
                vae, uris, config.resolution, device, with_flips=config.random_flip
            )
        return caches[tuple(uris)]

    return [
        TrainingData(instance=encoded(instance), prior=encoded(prior) if prior else None)
        for instance, prior in subjects_images
    ]


def _make_trainable(denoiser, trained_encoders, family: ModelFamily, config: TrainConfig, num_subjects: int):
    """Mark what trains (full: every weight of the denoiser and `trained_encoders`; LoRA: adapters on them) and
    group a pack's adapters."""
    if config.mode == "lora":
        targets = config.lora_target_modules or family.denoiser_lora_targets
        lora.add_denoiser_adapter(denoiser, targets, config.lora_rank, config.lora_alpha)
        for encoder in trained_encoders.values():
            lora.add_text_encoder_adapter(
                encoder, family.text_encoder_lora_targets, config.lora_rank, config.lora_alpha
            )
    else:
        for module in (denoiser, *trained_encoders.values()):
            module.requires_grad_(True)
    return GroupedAdapters(denoiser, num_subjects) if num_subjects > 1 else None


def setup_trainer(
    pipe,
    subjects: list[TrainSubject],
    subjects_images: list[tuple[list[str], list[str]]],
    config: TrainConfig,
    device: str | torch.device,
) -> Trainer:
    """Encode the data once, make the trainable modules and the optimizer, on `device`. `subjects_images[k]` is
    subject k's (instance URIs, prior URIs); the prior term is on when every subject has prior images."""
    family = models.family_of(pipe)
    if len(subjects) > 1 and config.cuda_graph:
        # a pack's batch shrinks when a subject drops out (non-finite loss): no static shapes to capture
        log.info("train.cuda_graph applies to single-subject training; the packed step runs eagerly")
        config = config.model_copy(update={"cuda_graph": False})
    speed = speed_options(config, device)
    seed_everything(config.seed)  # the global RNG draws the LoRA initialisation: the same for every run
    denoiser, vae, encoders = family.denoiser(pipe), pipe.vae, family.text_encoders(pipe)
    model_output = config.prior_mode == "model_output"
    use_prior = config.prior_loss_weight > 0 and (model_output or all(prior for _, prior in subjects_images))

    # The data, encoded once; then the VAE (and the frozen text encoders) leave the device.
    for module in (vae, *encoders.values()):
        module.to(speed.device).eval()
    data = _encode_images(
        vae,
        [(i, p if use_prior and not model_output else []) for i, p in subjects_images],
        config,
        speed.device,
    )
    prompts = [p for s in subjects for p in (s.instance_prompt, s.class_prompt)]
    conditioning = family.encode_prompts(pipe, prompts, speed.device, config.resolution)
    vae.to("cpu")

    trained = family.trainable_text_encoders(pipe) if config.train_text_encoder else {}
    for name, encoder in encoders.items():
        encoder.requires_grad_(False)
        if name in trained:
            encoder.to(speed.device).train()
        else:
            encoder.to("cpu")  # frozen: its embeddings are cached
    # a full fine-tune's model-output targets come from an untouched copy (twice the denoiser's memory); LoRA
    # switches its adapters off instead
    frozen = None
    if model_output and use_prior and config.mode == "full":
        frozen = copy.deepcopy(denoiser).requires_grad_(False).to(speed.device).eval()
    if config.base_precision == "bf16":
        quantization.cast_frozen_to_bf16(denoiser)
    grouped = _make_trainable(denoiser, trained, family, config, len(subjects))
    if config.base_precision != "fp32":
        quantization.upcast_trainable(denoiser)
    denoiser.to(speed.device).train()
    if speed.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in trained.values():
            encoder.gradient_checkpointing_enable()
    named_trainable = {
        f"{prefix}.{name}": p
        for prefix, module in {family.denoiser_name: denoiser, **trained}.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    param_groups = [
        {"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": config.learning_rate}
    ]
    if trained:
        param_groups.append(
            {
                "params": [p for e in trained.values() for p in e.parameters() if p.requires_grad],
                "lr": config.text_encoder_learning_rate or config.learning_rate,
            }
        )
    return Trainer(
        family=family,
        denoiser=denoiser,
        denoiser_forward=models.compile_module(denoiser) if speed.compile else denoiser,
        trained_encoders=trained,
        noise_scheduler=family.noise_scheduler(pipe, config),
        data=data,
        prompts=conditioning,
        generators=[torch.Generator(device=speed.device).manual_seed(config.seed) for _ in subjects],
        optimizer=make_optimizer(param_groups, config, speed),
        params=[p for group in param_groups for p in group["params"]],
        named_trainable=named_trainable,
        speed=speed,
        scaler=torch.amp.GradScaler(speed.device.type) if speed.grad_scaler else None,
        batch_size=config.batch_size,
        prior_loss_weight=config.prior_loss_weight if use_prior else 0.0,
        prior_mode=config.prior_mode,
        max_grad_norm=config.max_grad_norm,
        grouped=grouped,
        frozen_denoiser=frozen,
        active=list(range(len(subjects))),
    )
