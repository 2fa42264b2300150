"""Fine-tuning with prior preservation (the paper's Eq. 2): full UNet or LoRA, resumable, on cached latents.

`run` reads top to bottom like nanoGPT's train.py: set-up (load, encode the data once, read the speed options in
one place, maybe resume), the loop (the step, logging, checkpointing), then the export. `train_step` is the step
itself; the benchmark (bench.py) times this same function.

Speed by design, not by flags in the loop: the VAE and the frozen text encoder run once before training
(latents.py); a step is one UNet forward/backward over the subject and prior latents together; the loss is read
back (`.item()`, a device sync) only every `log_every` steps, and non-finite losses are caught on the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from dreambooth_lib import models, storage
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError, TrainingError
from dreambooth_lib.models import lora
from dreambooth_lib.train import checkpoint
from dreambooth_lib.train.data import (
    TrainingData,
    encode_conditioning,
    encode_images,
    list_png,
    sdxl_text_conditioning,
)
from dreambooth_lib.train.loss import diffusion_target, dreambooth_loss

log = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"
MODEL_MARKER_NAME = "dreambooth_model.json"
# TrainConfig fields that change what a step computes: a checkpoint only resumes a run that agrees on all of them.
# (steps may grow; logging, checkpointing, device and compile settings may change between attempts.)
RESUME_MUST_MATCH = (
    "mode",
    "learning_rate",
    "prior_loss_weight",
    "train_text_encoder",
    "text_encoder_learning_rate",
    "lora_rank",
    "lora_alpha",
    "batch_size",
    "resolution",
    "random_flip",
    "seed",
    "mixed_precision",
    "max_grad_norm",
    "adam_weight_decay",
    "use_8bit_adam",
)


class TrainResult(BaseModel):
    steps: int
    losses: list[tuple[int, float]]  # (step, mean loss since the previous log step)
    final_loss: float
    wall_time_s: float
    s_per_step: float  # training steps run by this call only (set-up and export excluded)
    peak_memory_bytes: int  # CUDA max_memory_allocated, else the process's peak RSS
    config: TrainConfig
    identifier: str
    class_noun: str
    instance_prompt: str
    class_prompt: str
    base_model: str
    base_model_digest: str
    model_uri: str
    mode: str
    resumed_from: int | None  # the checkpoint step this call continued from
    checkpoint_dir: (
        str  # where this run's checkpoints live (keyed by its content); deleted after success unless kept
    )
    num_instance_images: int
    num_prior_images: int
    device: str
    precision: str


# --- speed options: read here, once --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedOptions:
    """How the step runs on this device. Every speed flag of TrainConfig is resolved here and nowhere else."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not
    fused_adam: bool
    adam_8bit: bool
    compile: bool
    cuda_graph: bool  # the whole step as one CUDA graph (graphs.GraphedStep); resolved to False off CUDA
    gradient_checkpointing: bool

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def speed_options(config: TrainConfig, device: str | torch.device) -> SpeedOptions:
    device = torch.device(device)
    cuda = device.type == "cuda"
    if config.mixed_precision == "auto":
        # bf16 autocast where the hardware has it; fp32 on CPU, where bf16 matmuls are emulated and slower
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    else:
        dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    cuda_graph = config.cuda_graph and cuda
    if config.cuda_graph and not cuda:
        log.warning("train.cuda_graph applies on CUDA devices only; on %s the step runs eagerly", device)
    return SpeedOptions(
        device=device,
        autocast_dtype=dtype,
        grad_scaler=dtype is torch.float16,
        fused_adam=cuda and not config.use_8bit_adam,
        adam_8bit=config.use_8bit_adam,
        compile=config.compile,
        cuda_graph=cuda_graph,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def make_optimizer(param_groups: list[dict[str, Any]], config: TrainConfig, speed: SpeedOptions):
    if speed.adam_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "train.use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes (CUDA only), "
                "or set use_8bit_adam: false"
            ) from None
        return bnb.optim.AdamW8bit(param_groups, weight_decay=config.adam_weight_decay)
    extra = {"fused": True} if speed.fused_adam else {"foreach": True}
    if speed.cuda_graph:
        extra["capturable"] = True  # the step counter lives on the device, so the update can be replayed
    return torch.optim.AdamW(param_groups, weight_decay=config.adam_weight_decay, **extra)


# --- the trainer state and the step --------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything a training step touches (built by `setup_training`)."""

    unet: torch.nn.Module  # the module whose weights are saved
    unet_forward: Any  # the same module, maybe torch.compile'd
    text_encoder: torch.nn.Module | None  # only when trained; otherwise its embeddings are cached in `data`
    text_encoder_2: torch.nn.Module | None  # SDXL's second encoder, when the text encoders are trained
    noise_scheduler: Any
    data: TrainingData
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    named_trainable: dict[str, torch.nn.Parameter]  # "unet.<name>" / "text_encoder[_2].<name>" -> parameter
    generator: torch.Generator  # noise, timesteps, latent draws and sample order: the run's only randomness
    speed: SpeedOptions
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    batch_size: int
    prior_loss_weight: float
    max_grad_norm: float | None
    prompt_rows: torch.Tensor  # which cached prompt each row of the batch uses (0 instance, 1 class)


def draw_batch(
    data: TrainingData, gen: torch.Generator, bs: int, num_train_timesteps: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, noise, timesteps) of one step: `bs` subject rows, then `bs` prior rows (when there is a prior),
    all drawn from `gen` in a fixed order. Packed training (packed.py) draws each subject's rows with this same
    function, which is what makes a packed subject repeat its single-subject run."""
    latents = [
        data.instance.sample(torch.randint(len(data.instance), (bs,), generator=gen, device=device), gen)
    ]
    if data.prior is not None:  # each term with its own images, noise and timesteps, in one UNet batch
        latents.append(
            data.prior.sample(torch.randint(len(data.prior), (bs,), generator=gen, device=device), gen)
        )
    latents = torch.cat(latents)
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
    return latents, noise, timesteps


def train_step(t: Trainer) -> torch.Tensor:
    """One optimizer step of Eq. 2 on fresh draws of subject and prior latents; returns the loss, on the device."""
    return step_on_batch(t, *draw_step_batch(t))


def draw_step_batch(t: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's random draws (latents, noise, timesteps): the only part of a step that a CUDA graph leaves out,
    so that a graphed run draws from `t.generator` exactly as an eager one does."""
    return draw_batch(
        t.data, t.generator, t.batch_size, t.noise_scheduler.config.num_train_timesteps, t.speed.device
    )


def step_on_batch(
    t: Trainer,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    zero_grad: bool = True,
) -> torch.Tensor:
    """Forward, Eq. 2, backward, clipping and the optimizer step on one drawn batch; returns the loss (device).

    Capture-safe when `t.speed.cuda_graph` (graphs.GraphedStep captures this function with zero_grad=False: the
    gradients a captured backward writes are the graph's static buffers, overwritten by every replay)."""
    device, bs = t.speed.device, t.batch_size
    noisy = t.noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(t.noise_scheduler, latents, noise, timesteps)

    dtype = t.speed.autocast_dtype
    with torch.autocast(
        device.type,
        dtype=dtype or torch.bfloat16,
        enabled=dtype is not None,
        # the cast-weight cache would hold tensors made during capture and freed after it
        cache_enabled=not t.speed.cuda_graph,
    ):
        embeds, added = t.data.prompt_embeds, t.data.added_cond
        # trained SDXL encoders: both encoders' states, and the pooled embedding from the second
        if t.text_encoder_2 is not None:
            embeds, pooled = sdxl_text_conditioning(
                t.text_encoder, t.text_encoder_2, t.data.input_ids, t.data.input_ids_2
            )
            added = {**added, "text_embeds": pooled}
        elif t.text_encoder is not None:  # trained: two prompts through the encoder, shared by all rows
            embeds = t.text_encoder(t.data.input_ids)[0]
        extra = {}
        if added is not None:  # SDXL: pooled text embeddings and size/crop ids, per row
            extra["added_cond_kwargs"] = {k: v[t.prompt_rows] for k, v in added.items()}
        pred = t.unet_forward(noisy, timesteps, embeds[t.prompt_rows], return_dict=False, **extra)[0]
    prior = t.data.prior is not None
    loss = dreambooth_loss(
        pred[:bs],
        target[:bs],
        pred[bs:] if prior else None,
        target[bs:] if prior else None,
        t.prior_loss_weight,
    )

    if t.scaler is not None:
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.optimizer)
    else:
        loss.backward()
    if t.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(t.params, t.max_grad_norm)
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    if zero_grad:
        t.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_base_for_training(base_model: str, config: TrainConfig, allow_pickle: bool):
    """(device, base model digest, pipeline): the set-up single-subject and packed training share."""
    device = torch.device(models.resolve_device(config.device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_digest = models.model_digest(base_model, allow_pickle=allow_pickle)
    pipe = models.load_pipeline(base_model, allow_pickle=allow_pickle)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ConfigError(
            f"{base_model}: a {type(pipe).__name__} has no UNet/VAE; train supports Stable Diffusion 1.x/2.x "
            "and SDXL pipelines"
        )
    return device, base_digest, pipe


def setup_training(
    pipe,
    instance_uris: list[str],
    prior_uris: list[str],
    instance_prompt: str,
    class_prompt: str,
    config: TrainConfig,
    device: str | torch.device,
) -> Trainer:
    """Encode the data once, make the trainable modules (full or LoRA) and the optimizer, on `device`."""
    from diffusers import DDPMScheduler

    speed = speed_options(config, device)
    seed_everything(config.seed)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    use_prior = config.prior_loss_weight > 0 and len(prior_uris) > 0

    # The data, encoded once; then the VAE (and the frozen text encoder) leave the device.
    vae.to(speed.device).eval()
    text_encoder.to(speed.device).eval()
    flips = config.random_flip
    input_ids, prompt_embeds, added_cond, input_ids_2 = encode_conditioning(
        pipe, [instance_prompt, class_prompt], speed.device, config.resolution
    )
    data = TrainingData(
        instance=encode_images(vae, instance_uris, config.resolution, speed.device, with_flips=flips),
        prior=encode_images(vae, prior_uris, config.resolution, speed.device, with_flips=flips)
        if use_prior
        else None,
        input_ids=input_ids,
        prompt_embeds=prompt_embeds,
        added_cond=added_cond,
        input_ids_2=input_ids_2,
    )
    vae.to("cpu")
    train_te = config.train_text_encoder
    # SDXL's second encoder is trained alongside the first (diffusers' SDXL recipe); the first stays in `text_encoder`
    encoders = [text_encoder] + ([pipe.text_encoder_2] if models.is_sdxl(pipe) else [])

    # The trainable parameters: every UNet weight, or LoRA adapters; the text encoder's when asked.
    if config.mode == "lora":
        lora.add_lora_adapters(unet, None, config.lora_rank, config.lora_alpha)
        for encoder in encoders if train_te else []:
            lora.add_text_encoder_adapter(encoder, config.lora_rank, config.lora_alpha)
    else:
        unet.requires_grad_(True)
        for encoder in encoders:
            encoder.requires_grad_(train_te)
    unet.to(speed.device).train()
    trained = {"unet": unet}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders, strict=False):
        if train_te:
            encoder.to(speed.device).train()
            trained[name] = encoder
        else:
            encoder.requires_grad_(False).to("cpu")
    if speed.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders if train_te else []:
            encoder.gradient_checkpointing_enable()
    named_trainable = {
        f"{prefix}.{name}": p
        for prefix, module in trained.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.learning_rate}]
    if train_te:
        te_lr = config.text_encoder_learning_rate or config.learning_rate
        param_groups.append(
            {"params": [p for e in encoders for p in e.parameters() if p.requires_grad], "lr": te_lr}
        )

    bs = config.batch_size
    rows = [0] * bs + ([1] * bs if use_prior else [])
    return Trainer(
        unet=unet,
        unet_forward=models.compile_module(unet) if speed.compile else unet,
        text_encoder=text_encoder if train_te else None,
        text_encoder_2=encoders[1] if train_te and len(encoders) > 1 else None,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        data=data,
        optimizer=make_optimizer(param_groups, config, speed),
        params=[p for group in param_groups for p in group["params"]],
        named_trainable=named_trainable,
        generator=torch.Generator(device=speed.device).manual_seed(config.seed),
        speed=speed,
        scaler=torch.amp.GradScaler(speed.device.type) if speed.grad_scaler else None,
        batch_size=bs,
        prior_loss_weight=config.prior_loss_weight if use_prior else 0.0,
        max_grad_norm=config.max_grad_norm,
        prompt_rows=torch.tensor(rows, device=speed.device),
    )


# --- losses, read back only at log steps -------------------------------------------------------------------------


class LossTracker:
    """Sums losses on the device (no sync per step) and remembers the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), device=device)
        self.count = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.sum += loss.float()
        self.count += 1
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(
            bad, torch.full_like(self.first_bad_step, step), self.first_bad_step
        )

    def raise_if_not_finite(self) -> None:
        step = int(self.first_bad_step.item())
        if step >= 0:
            raise TrainingError(
                f"the loss became non-finite (NaN/inf) at step {step}; nothing was saved as a finished model. "
                "Lower train.learning_rate, or use mixed_precision: bf16 instead of fp16"
            )

    def mean_since_last_read(self) -> float:
        value = (self.sum / max(self.count, 1)).item()
        self.sum.zero_()
        self.count = 0
        return value


# --- checkpoint <-> trainer ------------------------------------------------------------------------------------------


def _snapshot(t: Trainer, step: int, info: dict[str, Any]) -> checkpoint.Checkpoint:
    return checkpoint.snapshot(
        step, t.named_trainable, t.optimizer, info, generator=t.generator, scaler=t.scaler
    )


def _restore(t: Trainer, ckpt: checkpoint.Checkpoint) -> None:
    checkpoint.restore(ckpt, t.named_trainable, t.optimizer, generator=t.generator, scaler=t.scaler)


def _fingerprint(
    config: TrainConfig, base_digest: str, identifier: str, class_noun: str, instance, prior
) -> dict:
    return {
        "config": config.model_dump(mode="json", include=set(RESUME_MUST_MATCH)),
        "base_model_digest": base_digest,
        "identifier": identifier,
        "class_noun": class_noun,
        "instance_images": [storage.basename(u) for u in instance],
        "num_prior_images": len(prior),
    }


def checkpoint_key(fingerprint: dict, instance_uris: list[str], prior_key: str | None, prior_uris) -> str:
    """The content key of a run's checkpoints: its fingerprint (config, base digest, identifier, class) plus the
    bytes of the subject photos and the prior set (its content-addressed key, or its bytes when none is known).
    A retried or resubmitted task with the same content finds its checkpoints; any other run never does."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for uri in instance_uris:
        digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    if prior_key:
        digest.update(f"prior:{prior_key}:{len(prior_uris)}".encode())
    else:
        for uri in prior_uris:
            digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    return "train-" + digest.hexdigest()[:20]


def _check_fingerprint(uri: str, saved: dict, current: dict) -> None:
    diffs = [
        f"config.{k}: checkpoint {v!r}, now {current['config'].get(k)!r}"
        for k, v in saved["config"].items()
        if current["config"].get(k) != v
    ]
    diffs += [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        # both sides' keys, in order: a packed run's subjects may differ in number
        for k in dict.fromkeys([*saved, *current])
        if k != "config" and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise TrainingError(
            f"{uri}: cannot resume, this run differs from the checkpointed one ({'; '.join(diffs)}); "
            "resume with the same settings, or train into a new out folder"
        )


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# --- the step function ---------------------------------------------------------------------------------------------


def run(
    base_model: str,
    instance_dir: str,
    prior_dir: str | None,
    identifier: str,
    class_noun: str,
    config: TrainConfig,
    out: str,
    resume: bool = False,
    allow_pickle: bool = False,
    instance_images: list[str] | None = None,
    prior_images: list[str] | None = None,
    checkpoint_root: str | None = None,
    prior_key: str | None = None,
) -> TrainResult:
    """Fine-tune `base_model` on the subject (instance_dir) with prior preservation (prior_dir); write out/model.

    Checkpoints go to `<checkpoint_root>/<checkpoint_key>/` (default root: out/checkpoints), so the output folder
    holds the model and its summary only and a retried task on an empty disk resumes from a durable root; they
    are deleted once the model is published unless `keep_checkpoints_on_success`. `prior_key`, the prior set's
    content key, spares hashing its images for that key."""
    started = time.perf_counter()
    out = str(out)
    instance_prompt, class_prompt = f"a {identifier} {class_noun}", f"a {class_noun}"

    # --- set-up ---
    instance_uris = list(instance_images) if instance_images is not None else list_png(instance_dir)
    if not instance_uris:
        raise ConfigError(
            f"{instance_dir}: no .png subject images; run `dreambooth ingest` into this folder first"
        )
    prior_uris: list[str] = []
    if config.prior_loss_weight > 0:
        if prior_images is not None:
            prior_uris = list(prior_images)
        elif prior_dir is not None:
            prior_uris = list_png(prior_dir)
        if not prior_uris:
            raise ConfigError(
                f"prior_dir {prior_dir!r}: no class-prior images, but train.prior_loss_weight is "
                f"{config.prior_loss_weight}; generate a prior set (`dreambooth prior`) or set prior_loss_weight: 0"
            )
    device, base_digest, pipe = load_base_for_training(base_model, config, allow_pickle)
    fingerprint = _fingerprint(config, base_digest, identifier, class_noun, instance_uris, prior_uris)
    ckpt_root = storage.join(
        checkpoint_root or storage.join(out, "checkpoints"),
        checkpoint_key(fingerprint, instance_uris, prior_key, prior_uris),
    )
    newest = checkpoint.newest_to_resume(ckpt_root, resume, "delete that folder to start over")
    t = setup_training(pipe, instance_uris, prior_uris, instance_prompt, class_prompt, config, device)
    losses: list[tuple[int, float]] = []
    tracker = LossTracker(device)
    start_step, resumed_from = 0, None
    if resume and newest:
        ckpt = checkpoint.load_checkpoint(newest)
        _check_fingerprint(newest, ckpt.info["fingerprint"], fingerprint)
        if ckpt.step > config.steps:
            raise TrainingError(
                f"{newest}: is at step {ckpt.step}, past train.steps={config.steps}; raise steps"
            )
        _restore(t, ckpt)
        start_step = resumed_from = ckpt.step
        losses = [(int(s), float(v)) for s, v in ckpt.info["losses"]]
        tracker.sum.fill_(ckpt.info["pending_loss_sum"])
        tracker.count = ckpt.info["pending_loss_count"]
        log.info("resuming from %s (step %d)", newest, ckpt.step)
    log.info(
        "training %s: %d subject + %d prior images, %s, %s%s, %d steps",
        config.mode,
        len(instance_uris),
        len(prior_uris),
        device,
        t.speed.precision,
        ", CUDA graph" if t.speed.cuda_graph else "",
        config.steps,
    )

    # --- the loop: the step, logging, checkpointing ---
    from dreambooth_lib.train import cuda_graph as graphs

    step_fn = graphs.make_step_fn(t)  # train_step, or the same step as one replayed CUDA graph
    loop_started = time.perf_counter()
    for step in range(start_step + 1, config.steps + 1):
        loss = step_fn()
        tracker.add(loss, step)
        last = step == config.steps
        if step % config.log_every == 0 or last:
            tracker.raise_if_not_finite()
            losses.append((step, tracker.mean_since_last_read()))
            log.info("step %d/%d loss %.5f", step, config.steps, losses[-1][1])
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            tracker.raise_if_not_finite()  # a checkpoint must never hold poisoned weights
            info = {
                "fingerprint": fingerprint,
                "losses": losses,
                "pending_loss_sum": float(tracker.sum.item()),
                "pending_loss_count": tracker.count,
            }
            checkpoint.save_checkpoint(ckpt_root, _snapshot(t, step, info))
            checkpoint.prune_checkpoints(ckpt_root, config.keep_checkpoints)
    steps_run = config.steps - start_step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    s_per_step = (time.perf_counter() - loop_started) / max(steps_run, 1)
    tracker.raise_if_not_finite()

    # --- export: out/model, then the summary (last: its presence means the run finished) ---
    result = publish(
        out,
        lambda folder: _export_model(
            folder, pipe, t, config, base_model, base_digest, identifier, class_noun
        ),
        started,
        steps=config.steps,
        losses=losses,
        s_per_step=s_per_step,
        peak_memory_bytes=_peak_memory_bytes(device),
        config=config,
        identifier=identifier,
        class_noun=class_noun,
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        base_model=base_model,
        base_model_digest=base_digest,
        mode=config.mode,
        resumed_from=resumed_from,
        checkpoint_dir=ckpt_root,
        num_instance_images=len(instance_uris),
        num_prior_images=len(prior_uris),
        device=str(device),
        precision=t.speed.precision,
    )
    if not config.keep_checkpoints_on_success:
        storage.delete_prefix(ckpt_root)  # the model is published: nothing is left to resume
    log.info(
        "trained %d steps in %.1f s (%.3f s/step); model at %s",
        steps_run,
        result.wall_time_s,
        s_per_step,
        result.model_uri,
    )
    return result


def publish(out: str, write_model: Callable[[Path], None], started: float, **fields: Any) -> TrainResult:
    """Publish a finished run, the one way single and packed training both do it: the model is written into
    out/model.partial by `write_model`, renamed to out/model, and out/train_summary.json comes last (its
    presence means the run finished). `fields` are TrainResult's, less what is known only here (model_uri,
    final_loss, wall_time_s since `started`)."""
    model_uri = storage.join(out, "model")
    with storage.local_dir_for_writing(out) as stage:
        partial = Path(stage) / "model.partial"
        storage.delete_prefix(str(partial))
        write_model(partial)
        storage.delete_prefix(str(Path(stage) / "model"))
        storage.rename_prefix(str(partial), str(Path(stage) / "model"))
        losses = fields["losses"]
        result = TrainResult(
            model_uri=model_uri,
            final_loss=losses[-1][1] if losses else float("nan"),
            wall_time_s=time.perf_counter() - started,
            **fields,
        )
        storage.write_json(Path(stage) / SUMMARY_NAME, result.model_dump(mode="json"))
    return result


def _export_model(
    folder: Path, pipe, t: Trainer, config, base_model, base_digest, identifier, class_noun
) -> None:
    """Full: a complete diffusers folder (safetensors) + dreambooth_model.json. LoRA: the adapter + its marker."""
    marker = {
        "base_model": base_model,
        "base_model_digest": base_digest,
        "identifier": identifier,
        "class_noun": class_noun,
    }
    text_encoder = t.text_encoder  # None when it was not trained
    if config.mode == "lora":
        marker |= {"rank": config.lora_rank, "alpha": lora.lora_alpha(config.lora_rank, config.lora_alpha)}
        lora.save_lora_model(
            folder, t.unet, text_encoder, marker, sdxl=models.is_sdxl(pipe), text_encoder_2=t.text_encoder_2
        )
        return
    pipe.unet = t.unet.to("cpu").eval()
    if text_encoder is not None:
        pipe.text_encoder = text_encoder.to("cpu").eval()
    if t.text_encoder_2 is not None:
        pipe.text_encoder_2 = t.text_encoder_2.to("cpu").eval()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # save_pretrained writes only the tokenizer files of the installed transformers; keep the base's others
    # (vocab.json, merges.txt) so older readers load the model too
    for name in ("tokenizer", "tokenizer_2"):
        base_tokenizer = models.resolve_model_dir(base_model, allow_pickle=True) / name
        if not base_tokenizer.is_dir():
            continue
        for f in storage.list_files(str(base_tokenizer), recursive=False):
            target = folder / name / storage.basename(f)
            if not target.exists():
                storage.copy(f, str(target))
    marker |= {
        "mode": "full",
        "instance_prompt": f"a {identifier} {class_noun}",
        "class_prompt": f"a {class_noun}",
    }
    storage.write_json(folder / MODEL_MARKER_NAME, marker)
