"""Packed multi-subject LoRA training: K subjects, K adapters, one process, one UNet batch per step.

A LoRA step on one subject (1 subject + 1 prior image) leaves a large GPU mostly idle: the frozen UNet's weights
are read once per forward whatever the batch. Packing trains K subjects in one batch: each targeted Linear
(to_q/to_k/to_v/to_out.0, as lora.py) becomes one `GroupedLoRALinear` holding all K adapters, A: [K, r, in] and
B: [K, out, r], and each row of the batch goes through its own subject's adapter,

    y = base(x) + scale * ((x @ A[idx]^T) @ B[idx]^T)        idx: the adapter of each row,

as two batched matmuls over the gathered per-row weights (not K passes). A subject's prior rows go through its
own adapter too: in Eq. 2 they regularise that subject's model.

Packing is equivalent to K single-subject runs, not an approximation of them:
- the loss is the sum of the subjects' own Eq. 2 losses, and rows never mix in the UNet (GroupNorm and attention
  are per sample), so adapter k's gradient comes from subject k's loss alone;
- each subject draws its rows from its own generator seeded as `train.run` seeds its one (`train.draw_batch`,
  the very function the single-subject step calls), and starts from the adapter `train.run` would make;
- gradients are clipped per adapter (the global-norm clip of each single run), and AdamW is elementwise.
So subject k's adapter after N packed steps equals its single run's up to float rounding (the test checks it).
A subject whose loss turns non-finite is dropped from the batch at the next loss read-back and gets a failed
result naming the step; the others go on and still equal their single runs. fp16 (whose GradScaler skips the
step for everyone when any gradient overflows) and 8-bit Adam (quantised in blocks that would span subjects)
would break that isolation and are refused.

Each subject's output is exactly a single LoRA run's: `out/model/` (pytorch_lora_weights.safetensors +
dreambooth_lora.json, written by lora.save_lora_model) and `out/train_summary.json` (a train.TrainResult).

Checkpoints (every `train.checkpoint_every` steps, checkpoint.py's atomic format) hold the whole pack: all K
adapters' A/B tensors, the optimizer, every subject's generator and the global RNGs, the step, the per-subject
losses (logged and pending) and which subjects were dropped (and at which step). They live in the pack's own
folder: `run_packed(checkpoint_dir=...)`; `train_packed_subjects` uses `<work_dir>/.pack-<hash of the subjects'
names>` with work_dir defaulting to the folder above the pack's first subject's `out`. A preempted pack rerun with
resume=True continues from its newest complete checkpoint, and ends bit-identical (CPU) to an uninterrupted run;
the checkpoint folder is deleted once every subject's output is written (the outputs are what the pack is for).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from dreambooth_lib import models, storage
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError, DreamboothError, TrainingError
from dreambooth_lib.models import lora
from dreambooth_lib.train import checkpoint
from dreambooth_lib.train.data import LatentCache, TrainingData, encode_conditioning, encode_images, list_png
from dreambooth_lib.train.loop import (
    SpeedOptions,
    TrainResult,
    _check_fingerprint,
    _fingerprint,
    _peak_memory_bytes,
    draw_batch,
    load_base_for_training,
    make_optimizer,
    publish,
    seed_everything,
    speed_options,
)
from dreambooth_lib.train.loss import diffusion_target, dreambooth_loss

log = logging.getLogger(__name__)

MAX_PACK_SIZE = 16
# Measured on an H200 (FACTS.md): an SD-1.5 LoRA step at 512 px with 1+1 images peaks at 7.0 GiB, of which the
# fp32 UNet is 3.4 GiB; a packed subject adds its rows' activations. Rounded up, with room for the allocator.
PACKED_SUBJECT_BYTES_512 = 4 * 2**30  # one subject, 1 subject + 1 prior image at 512 px
PACKED_FIXED_BYTES = 6 * 2**30  # the frozen UNet, the CUDA context and workspace


class PackedSubject(BaseModel):
    """One subject of a pack: its images, its identifier prompt, and the folder its model is written to."""

    name: str
    instance_dir: str
    prior_dir: str | None
    identifier: str
    class_noun: str
    out: str
    instance_images: list[str] | None = None  # default: the PNGs directly inside instance_dir
    prior_images: list[str] | None = None  # default: the PNGs directly inside prior_dir


class PackedResult(BaseModel):
    """What happened to one packed subject: its TrainResult, or the error (and step) that stopped it."""

    name: str
    ok: bool
    model_uri: str | None = None
    error: str | None = None
    failed_step: int | None = None
    train: TrainResult | None = None


def default_pack_size(
    device: str | torch.device = "auto",
    resolution: int = 512,
    batch_size: int = 1,
    max_pack: int = MAX_PACK_SIZE,
    base_model: str | None = None,
) -> int:
    """Subjects to pack on `device`: 1 on CPU (nothing is gained: the CPU is busy with one), else as many as the
    free CUDA memory holds by the per-subject estimate above (activations scale with pixels and rows, and both
    terms with the UNet's size relative to SD 1.5's, read from `base_model`'s safetensors headers: SDXL ~3x)."""
    device = torch.device(models.resolve_device(str(device)))
    if device.type != "cuda":
        return 1
    scale = 1.0
    if base_model is not None:
        scale = max(1.0, models.unet_parameter_count(base_model) / models.SD15_UNET_PARAMETERS)
    free, _ = torch.cuda.mem_get_info(device)
    per_subject = PACKED_SUBJECT_BYTES_512 * (resolution / 512) ** 2 * batch_size * scale
    fits = int((0.9 * free - PACKED_FIXED_BYTES * scale) // per_subject)
    return max(1, min(max_pack, fits))


# --- the grouped LoRA layer ---------------------------------------------------------------------------------------


class AdapterRouter:
    """The adapter index of each row of the next forward, shared by every GroupedLoRALinear of the model."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # [rows] long, on the training device


class GroupedLoRALinear(torch.nn.Module):
    """A frozen Linear plus K LoRA adapters; each row of the batch goes through the adapter `router.index` names."""

    def __init__(
        self, base: torch.nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, router
    ):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Parameter(lora_a)  # [K, r, in]
        self.lora_B = torch.nn.Parameter(lora_b)  # [K, out, r]
        self.scaling = float(scaling)
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        index = self.router.index
        if index is None or index.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"GroupedLoRALinear: {x.shape[0]} rows but the router holds "
                f"{None if index is None else index.shape[0]} adapter indices; set router.index first"
            )
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, in]
        down = torch.bmm(rows, self.lora_A[index].transpose(1, 2))  # [rows, tokens, r]
        up = torch.bmm(down, self.lora_B[index].transpose(1, 2))  # [rows, tokens, out]
        return result + up.reshape(result.shape) * self.scaling


@dataclass
class _Slot:
    """Where a peft LoRA layer sat in the UNet and the grouped layer that replaces it while training."""

    parent: torch.nn.Module
    child: str
    peft_layer: torch.nn.Module
    grouped: GroupedLoRALinear


def _group_lora_layers(unet, num_adapters: int, router: AdapterRouter) -> list[_Slot]:
    """Swap every peft LoRA Linear of `unet` for a GroupedLoRALinear whose K adapters all start as its adapter."""
    slots = []
    for name, module in list(unet.named_modules()):
        if not (hasattr(module, "lora_A") and lora.ADAPTER_NAME in getattr(module, "lora_A", {})):
            continue
        a = module.lora_A[lora.ADAPTER_NAME].weight.detach()
        b = module.lora_B[lora.ADAPTER_NAME].weight.detach()
        grouped = GroupedLoRALinear(
            module.base_layer,
            a.unsqueeze(0).repeat(num_adapters, 1, 1),
            b.unsqueeze(0).repeat(num_adapters, 1, 1),
            module.scaling[lora.ADAPTER_NAME],
            router,
        )
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, grouped)
        slots.append(_Slot(parent, child, module, grouped))
    if not slots:
        raise RuntimeError("no LoRA layers found in the UNet; add_lora_adapters must run first")
    return slots


# --- the packed trainer and its step ------------------------------------------------------------------------------


@dataclass
class PackedTrainer:
    """Everything a packed step touches (built by `setup_packed`)."""

    unet: torch.nn.Module
    unet_forward: Any  # the same module, maybe torch.compile'd
    noise_scheduler: Any
    router: AdapterRouter
    slots: list[_Slot]
    data: list[TrainingData]  # per subject
    generators: list[torch.Generator]  # per subject, each seeded as a single run's
    prompt_embeds: torch.Tensor  # [2K, L, D]: subject k's instance prompt at 2k, its class prompt at 2k+1
    # SDXL: pooled embeddings and size/crop ids, in the rows of prompt_embeds; None on SD 1.x/2.x
    added_cond: dict[str, torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # every lora_A / lora_B, each [K, ...]
    speed: SpeedOptions
    batch_size: int
    prior_loss_weight: float
    max_grad_norm: float | None
    sdxl: bool = False
    active: list[int] = field(default_factory=list)  # subjects still in the batch
    _layout: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def num_subjects(self) -> int:
        return len(self.data)

    def layout(self) -> tuple[torch.Tensor, ...]:
        """(adapter index, prompt row) of each batch row, and the active subjects, as device tensors made once per
        active set: a host-to-device copy every step would stall the GPU."""
        key = tuple(self.active)
        if key not in self._layout:
            bs, prior = self.batch_size, self.prior_loss_weight > 0
            adapter, prompt = [], []
            for k in key:
                adapter += [k] * bs * (2 if prior else 1)
                prompt += [2 * k] * bs + ([2 * k + 1] * bs if prior else [])
            dev = self.speed.device
            self._layout[key] = tuple(torch.tensor(v, device=dev) for v in (adapter, prompt, key))
        return self._layout[key]


def packed_step(t: PackedTrainer) -> torch.Tensor:
    """One optimizer step of every active subject's Eq. 2 in one UNet batch; returns the [K] losses on the device
    (0 for subjects no longer in the batch). Nothing is read back to the host."""
    device, bs = t.speed.device, t.batch_size
    num_train_timesteps = t.noise_scheduler.config.num_train_timesteps
    draws = [draw_batch(t.data[k], t.generators[k], bs, num_train_timesteps, device) for k in t.active]
    latents = torch.cat([d[0] for d in draws])
    noise = torch.cat([d[1] for d in draws])
    timesteps = torch.cat([d[2] for d in draws])
    noisy = t.noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(t.noise_scheduler, latents, noise, timesteps)
    adapter_index, prompt_rows, active = t.layout()
    t.router.index = adapter_index

    dtype = t.speed.autocast_dtype
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        extra = {}
        if t.added_cond is not None:
            extra["added_cond_kwargs"] = {k: v[prompt_rows] for k, v in t.added_cond.items()}
        pred = t.unet_forward(noisy, timesteps, t.prompt_embeds[prompt_rows], return_dict=False, **extra)[0]
    prior = t.prior_loss_weight > 0
    rows = bs * (2 if prior else 1)
    subject_losses = []
    for j in range(len(t.active)):
        p, y = pred[j * rows : (j + 1) * rows], target[j * rows : (j + 1) * rows]
        subject_losses.append(
            dreambooth_loss(
                p[:bs], y[:bs], p[bs:] if prior else None, y[bs:] if prior else None, t.prior_loss_weight
            )
        )
    subject_losses = torch.stack(subject_losses)
    # the sum: d(total)/d(adapter k) is d(loss k)/d(adapter k), since no other loss reaches adapter k
    subject_losses.sum().backward()
    if t.max_grad_norm is not None:
        clip_grad_norm_per_adapter(t.params, t.max_grad_norm)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)

    losses = torch.zeros(t.num_subjects, device=device)
    losses[active] = subject_losses.detach()
    return losses


def clip_grad_norm_per_adapter(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` applied to each adapter k alone (slice k of every [K, ...] parameter), as
    each single-subject run clips its own gradients. Returns the [K] norms before clipping, on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's formula, eps included
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


def setup_packed(
    pipe,
    subjects: list[PackedSubject],
    inputs: list[tuple[list[str], list[str]]],
    config: TrainConfig,
    device,
) -> PackedTrainer:
    """Encode every subject's data once, make K adapters (each the one `train.setup_training` would make) and the
    optimizer, on `device`. `inputs[k]` = (instance URIs, prior URIs) of subject k."""
    from diffusers import DDPMScheduler

    if config.cuda_graph:
        # a pack's batch shrinks when a subject drops out (non-finite loss): no static shapes to capture
        log.info("train.cuda_graph applies to single-subject training; the packed step runs eagerly")
        config = config.model_copy(update={"cuda_graph": False})
    speed = speed_options(config, device)
    # the same global-RNG state as train.setup_training when the adapters are made (encoding draws nothing)
    seed_everything(config.seed)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    use_prior = config.prior_loss_weight > 0
    vae.to(speed.device).eval()
    text_encoder.to(speed.device).eval()
    caches: dict[tuple[str, ...], LatentCache] = {}  # subjects of one class share their prior set's latents

    def encoded(uris: list[str]) -> LatentCache:
        key = tuple(uris)
        if key not in caches:
            caches[key] = encode_images(
                vae, uris, config.resolution, speed.device, with_flips=config.random_flip
            )
        return caches[key]

    data, embeds, added = [], [], []
    for subject, (instance_uris, prior_uris) in zip(subjects, inputs, strict=True):
        input_ids, prompt_embeds, added_cond, _ = encode_conditioning(
            pipe,
            [f"a {subject.identifier} {subject.class_noun}", f"a {subject.class_noun}"],
            speed.device,
            config.resolution,
        )
        embeds.append(prompt_embeds)
        added.append(added_cond)
        data.append(
            TrainingData(
                instance=encoded(instance_uris),
                prior=encoded(prior_uris) if use_prior else None,
                input_ids=input_ids,
                prompt_embeds=prompt_embeds,
                added_cond=added_cond,
            )
        )
    vae.to("cpu")
    text_encoder.requires_grad_(False).to("cpu")

    lora.add_lora_adapters(unet, None, config.lora_rank, config.lora_alpha)
    router = AdapterRouter()
    slots = _group_lora_layers(unet, len(subjects), router)
    unet.to(speed.device).train()
    if speed.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for s in slots for p in (s.grouped.lora_A, s.grouped.lora_B)]
    return PackedTrainer(
        unet=unet,
        unet_forward=models.compile_module(unet) if speed.compile else unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        router=router,
        slots=slots,
        data=data,
        generators=[torch.Generator(device=speed.device).manual_seed(config.seed) for _ in subjects],
        prompt_embeds=torch.cat(embeds),
        added_cond={k: torch.cat([a[k] for a in added]) for k in added[0]} if added[0] is not None else None,
        sdxl=models.is_sdxl(pipe),
        optimizer=make_optimizer([{"params": params, "lr": config.learning_rate}], config, speed),
        params=params,
        speed=speed,
        batch_size=config.batch_size,
        prior_loss_weight=config.prior_loss_weight if use_prior else 0.0,
        max_grad_norm=config.max_grad_norm,
        active=list(range(len(subjects))),
    )


class PackedLossTracker:
    """Per-subject loss sums and first non-finite step, kept on the device (no sync per step)."""

    def __init__(self, num_subjects: int, device: torch.device):
        self.sum = torch.zeros(num_subjects, device=device)
        self.count = 0
        self.first_bad_step = torch.full((num_subjects,), -1, dtype=torch.long, device=device)

    def add(self, losses: torch.Tensor, step: int) -> None:
        self.sum += losses
        self.count += 1
        bad = ~torch.isfinite(losses) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(
            bad, torch.full_like(self.first_bad_step, step), self.first_bad_step
        )

    def read(self) -> tuple[list[float], list[int]]:
        """(mean loss per subject since the last read, first non-finite step per subject or -1): one sync."""
        means = (self.sum / max(self.count, 1)).tolist()
        bad = self.first_bad_step.tolist()
        self.sum.zero_()
        self.count = 0
        return means, bad


# --- the step function ------------------------------------------------------------------------------------------


def _check_config(config: TrainConfig) -> None:
    refuse = {
        config.mode != "lora": "packed training trains LoRA adapters; set train.mode: lora, or train full "
        "fine-tunes one subject at a time (pack_size: 1)",
        config.train_text_encoder: "packed training adapts the UNet only; set train.train_text_encoder: false, "
        "or train such subjects one at a time (pack_size: 1)",
        config.mixed_precision == "fp16": "packed training cannot use fp16: its GradScaler skips the step of "
        "every packed subject when one overflows; use train.mixed_precision: bf16 (or auto)",
        config.use_8bit_adam: "packed training cannot use 8-bit Adam (its quantisation blocks span subjects); "
        "set train.use_8bit_adam: false",
    }
    for bad, message in refuse.items():
        if bad:
            raise ConfigError(message)


def _subject_inputs(subject: PackedSubject, config: TrainConfig) -> tuple[list[str], list[str]]:
    instance = (
        list(subject.instance_images)
        if subject.instance_images is not None
        else list_png(subject.instance_dir)
    )
    if not instance:
        raise ConfigError(
            f"subject {subject.name}: {subject.instance_dir}: no .png subject images; "
            "run `dreambooth ingest` into this folder first"
        )
    prior: list[str] = []
    if config.prior_loss_weight > 0:
        if subject.prior_images is not None:
            prior = list(subject.prior_images)
        elif subject.prior_dir is not None:
            prior = list_png(subject.prior_dir)
        if not prior:
            raise ConfigError(
                f"subject {subject.name}: prior_dir {subject.prior_dir!r}: no class-prior images, but "
                f"train.prior_loss_weight is {config.prior_loss_weight}; generate a prior set or set "
                "prior_loss_weight: 0"
            )
    return instance, prior


def run_packed(
    base_model: str,
    subjects: list[PackedSubject],
    config: TrainConfig,
    allow_pickle: bool = False,
    checkpoint_dir: str | None = None,
    resume: bool = False,
) -> list[PackedResult]:
    """Train each subject's LoRA adapter on `base_model`, all in one batch; write each subject's out/model and
    out/train_summary.json as `train.run` (mode lora) would. A subject whose loss turns non-finite gets a failed
    result; the others finish. Configuration errors (for any subject) raise ConfigError before training.

    `checkpoint_dir` (None: no checkpoints) is the pack's own folder: a checkpoint every `checkpoint_every` steps,
    deleted once every output is written. With resume=True the run continues from its newest complete checkpoint
    (none: from the start); one of a different pack or config raises TrainingError naming what differs. Without
    resume, a checkpoint there raises TrainingError rather than being overwritten."""
    started = time.perf_counter()
    _check_config(config)
    if not subjects:
        raise ConfigError("run_packed: no subjects given")
    for what in ("name", "out"):
        values = [getattr(s, what) for s in subjects]
        if len(set(values)) != len(values):
            raise ConfigError(f"packed subjects must have distinct {what}s; got {values}")
    inputs = [_subject_inputs(s, config) for s in subjects]
    newest = (
        checkpoint.newest_to_resume(checkpoint_dir, resume, "delete that folder to start over")
        if checkpoint_dir
        else None
    )
    device, base_digest, pipe = load_base_for_training(base_model, config, allow_pickle)
    fingerprint = _pack_fingerprint(config, base_digest, subjects, inputs)
    t = setup_packed(pipe, subjects, inputs, config, device)

    losses: list[list[tuple[int, float]]] = [[] for _ in subjects]
    failed: dict[int, int] = {}  # subject -> first non-finite step
    tracker = PackedLossTracker(len(subjects), device)
    start_step, resumed_from = 0, None
    if newest:
        ckpt = checkpoint.load_checkpoint(newest)
        _check_fingerprint(newest, ckpt.info["fingerprint"], fingerprint)
        if ckpt.step > config.steps:
            raise TrainingError(
                f"{newest}: is at step {ckpt.step}, past train.steps={config.steps}; raise steps"
            )
        checkpoint.restore(ckpt, _named_params(t), t.optimizer, generators=t.generators)
        start_step = resumed_from = ckpt.step
        losses = [[(int(s), float(v)) for s, v in subject] for subject in ckpt.info["losses"]]
        failed = {int(k): int(v) for k, v in ckpt.info["failed"].items()}
        t.active = [k for k in range(len(subjects)) if k not in failed]
        tracker.sum = torch.tensor(ckpt.info["pending_loss_sum"], dtype=tracker.sum.dtype, device=device)
        tracker.count = ckpt.info["pending_loss_count"]
        tracker.first_bad_step = torch.tensor(ckpt.info["first_bad_step"], dtype=torch.long, device=device)
        log.info("resuming the pack from %s (step %d)", newest, ckpt.step)
    log.info(
        "packed training: %d LoRA subjects, %s, %s, %d steps",
        len(subjects),
        device,
        t.speed.precision,
        config.steps,
    )

    def drop_non_finite(bad: list[int]) -> None:
        for k in list(t.active):
            if bad[k] >= 0:
                failed[k] = bad[k]
                t.active.remove(k)  # dropped: its rows leave the batch, its adapter stops training
                log.warning("subject %s: loss non-finite at step %d; dropped", subjects[k].name, bad[k])

    loop_started = time.perf_counter()
    step = start_step
    for step in range(start_step + 1, config.steps + 1):
        tracker.add(packed_step(t), step)
        if step % config.log_every == 0 or step == config.steps:
            means, bad = tracker.read()
            drop_non_finite(bad)
            if not t.active:
                break
            for k in t.active:
                losses[k].append((step, means[k]))
            log.info("step %d/%d loss %s", step, config.steps, " ".join(f"{means[k]:.5f}" for k in t.active))
        if checkpoint_dir and config.checkpoint_every and step % config.checkpoint_every == 0:
            # as train.run, a checkpoint never carries a poisoned adapter on: such subjects are dropped first
            drop_non_finite(tracker.first_bad_step.tolist())
            if not t.active:
                break
            info = {
                "fingerprint": fingerprint,
                "losses": losses,
                "failed": {str(k): v for k, v in failed.items()},
                "pending_loss_sum": tracker.sum.tolist(),  # float32 values, exact as JSON floats
                "pending_loss_count": tracker.count,
                "first_bad_step": tracker.first_bad_step.tolist(),
            }
            snap = checkpoint.snapshot(step, _named_params(t), t.optimizer, info, generators=t.generators)
            checkpoint.save_checkpoint(checkpoint_dir, snap)
            checkpoint.prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    s_per_step = (time.perf_counter() - loop_started) / max(step - start_step, 1)
    t.router.index = None

    # --- export: each surviving adapter back into peft's layers, written as a single LoRA run writes it ---
    for s in t.slots:
        setattr(s.parent, s.child, s.peft_layer)
    t.unet.to("cpu").eval()
    results = []
    for k, subject in enumerate(subjects):
        if k in failed:
            results.append(
                PackedResult(
                    name=subject.name,
                    ok=False,
                    failed_step=failed[k],
                    error=f"the loss became non-finite (NaN/inf) at step {failed[k]}; nothing was saved as a "
                    "finished model. Check this subject's images, or lower train.learning_rate",
                )
            )
            continue
        with torch.no_grad():
            for s in t.slots:
                s.peft_layer.lora_A[lora.ADAPTER_NAME].weight.copy_(s.grouped.lora_A[k])
                s.peft_layer.lora_B[lora.ADAPTER_NAME].weight.copy_(s.grouped.lora_B[k])
        result = _export(
            subject,
            k,
            t,
            config,
            base_model,
            base_digest,
            losses[k],
            inputs[k],
            started,
            s_per_step,
            resumed_from,
            checkpoint_dir or "",
        )
        results.append(PackedResult(name=subject.name, ok=True, model_uri=result.model_uri, train=result))
    if checkpoint_dir:
        storage.delete_prefix(checkpoint_dir)  # every output is written: nothing left to resume
    return results


def _named_params(t: PackedTrainer) -> dict[str, torch.nn.Parameter]:
    """The K-adapter tensors by their name in the UNet (`...to_q.lora_A`, [K, r, in]), in optimizer order."""
    names = {id(p): name for name, p in t.unet.named_parameters()}
    return {names[id(p)]: p for p in t.params}


def _pack_fingerprint(
    config: TrainConfig,
    base_digest: str,
    subjects: list[PackedSubject],
    inputs: list[tuple[list[str], list[str]]],
) -> dict:
    """train's resume fingerprint, per subject: the config fields that change a step, the base model, and each
    subject's name, identifier, class noun and images, flattened so a mismatch names the subject and field."""
    flat: dict = {"subjects": [s.name for s in subjects]}
    for k, (subject, (instance, prior)) in enumerate(zip(subjects, inputs, strict=True)):
        single = _fingerprint(config, base_digest, subject.identifier, subject.class_noun, instance, prior)
        flat["config"] = single.pop("config")
        flat["base_model_digest"] = single.pop("base_model_digest")
        flat |= {f"subject {subject.name} ({k}) {key}": value for key, value in single.items()}
    return flat


def _export(
    subject,
    k,
    t,
    config,
    base_model,
    base_digest,
    losses,
    inputs,
    started,
    s_per_step,
    resumed_from,
    checkpoint_dir,
) -> TrainResult:
    """out/model (via a .partial folder, as train.run) and then out/train_summary.json for subject k."""
    marker = {
        "base_model": base_model,
        "base_model_digest": base_digest,
        "identifier": subject.identifier,
        "class_noun": subject.class_noun,
        "rank": config.lora_rank,
        "alpha": lora.lora_alpha(config.lora_rank, config.lora_alpha),
    }
    return publish(
        str(subject.out),
        lambda folder: lora.save_lora_model(folder, t.unet, None, marker, sdxl=t.sdxl),
        started,
        steps=config.steps,
        losses=losses,
        s_per_step=s_per_step,
        peak_memory_bytes=_peak_memory_bytes(t.speed.device),
        config=config,
        identifier=subject.identifier,
        class_noun=subject.class_noun,
        instance_prompt=f"a {subject.identifier} {subject.class_noun}",
        class_prompt=f"a {subject.class_noun}",
        base_model=base_model,
        base_model_digest=base_digest,
        mode=config.mode,
        resumed_from=resumed_from,
        checkpoint_dir=checkpoint_dir,  # the pack's, deleted once every subject's output is written
        num_instance_images=len(inputs[0]),
        num_prior_images=len(inputs[1]),
        device=str(t.speed.device),
        precision=t.speed.precision,
    )


def train_packed_subjects(
    base_model: str,
    subjects: list[PackedSubject],
    config: TrainConfig,
    pack_size: int | None = None,
    allow_pickle: bool = False,
    resume: bool = True,
    work_dir: str | None = None,
) -> list[PackedResult]:
    """The batch entry point: train `subjects` (one base model) in packs of `pack_size` (None: as many as the
    device holds, `default_pack_size`); results in the order given. A subject's own failure, or a pack's, is
    returned as a failed result, never raised, so one bad subject never sinks the batch.

    Each pack checkpoints into `pack_checkpoint_dir(pack, work_dir)` and, with resume (the default: a preempted
    node's rerun), continues from its newest complete checkpoint there, or starts fresh when there is none.
    Full fine-tunes, text-encoder training and pack_size 1 run each subject alone through `train.run`.
    """
    from dreambooth_lib.train import loop as train

    if pack_size is None:
        pack_size = default_pack_size(
            config.device, config.resolution, config.batch_size, base_model=base_model
        )
    if pack_size < 1:
        raise ConfigError(f"pack_size must be at least 1, got {pack_size}")
    alone = pack_size == 1 or config.mode != "lora" or config.train_text_encoder
    results: list[PackedResult] = []
    if alone:
        for s in subjects:
            try:
                r = train.run(
                    base_model, s.instance_dir, s.prior_dir, s.identifier, s.class_noun, config, s.out,
                    resume=resume, allow_pickle=allow_pickle, instance_images=s.instance_images,
                    prior_images=s.prior_images,
                )  # fmt: skip
                results.append(PackedResult(name=s.name, ok=True, model_uri=r.model_uri, train=r))
            except Exception as err:  # the isolation boundary of one subject
                results.append(_failure(s, err))
        return results
    for start in range(0, len(subjects), pack_size):
        pack = subjects[start : start + pack_size]
        try:
            results += run_packed(
                base_model,
                pack,
                config,
                allow_pickle=allow_pickle,
                checkpoint_dir=pack_checkpoint_dir(pack, work_dir),
                resume=resume,
            )
        except Exception as err:  # a pack-wide failure (bad config, out of memory) fails its subjects only
            log.exception("pack %s failed", [s.name for s in pack])
            results += [_failure(s, err) for s in pack]
    return results


def pack_checkpoint_dir(pack: list[PackedSubject], work_dir: str | None = None) -> str:
    """`<work_dir>/.pack-<hash of the subjects' names, in order>`: the same pack finds its checkpoints again on a
    rerun, another pack never does. work_dir defaults to the folder above the first subject's `out`."""
    if work_dir is None:
        work_dir = str(pack[0].out).rstrip("/").rsplit("/", 1)[0]
    digest = hashlib.sha256("\n".join(s.name for s in pack).encode()).hexdigest()[:16]
    return storage.join(work_dir, f".pack-{digest}")


def _failure(subject: PackedSubject, err: Exception) -> PackedResult:
    message = str(err) if isinstance(err, DreamboothError) else f"{type(err).__name__}: {err}"
    return PackedResult(name=subject.name, ok=False, error=message)
