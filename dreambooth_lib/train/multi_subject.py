"""Packed multi-subject LoRA training: K subjects, K adapters, one process, one denoiser batch per step.

A LoRA step on one subject (1 subject + 1 prior image) leaves a large GPU mostly idle: the frozen denoiser's
weights are read once per forward whatever the batch. Packing trains K subjects in one batch: each targeted Linear
(the family's `denoiser_lora_targets`) becomes one `GroupedLoRALinear` holding all K adapters, A: [K, r, in] and
B: [K, out, r], and each row of the batch goes through its own subject's adapter,

    y = base(x) + scale * ((x @ A[idx]^T) @ B[idx]^T)        idx: the adapter of each row,

as two batched matmuls over the gathered per-row weights (not K passes). A subject's prior rows go through its
own adapter too: in Eq. 2 they regularise that subject's model.

Packing is equivalent to K single-subject runs, not an approximation of them:
- the loss is the sum of the subjects' own Eq. 2 losses, and rows never mix in the denoiser (GroupNorm and
  attention are per sample), so adapter k's gradient comes from subject k's loss alone;
- each subject draws its rows from its own generator seeded as a single run seeds its one (`step.draw_batch`),
  and starts from the adapter a single run would make;
- gradients are clipped per adapter (the global-norm clip of each single run), and AdamW is elementwise.
So subject k's adapter after N packed steps equals its single run's up to float rounding (the test checks it).
The loop is the single-subject one (`loop.train_subjects`): a subject whose loss turns non-finite is dropped from
the batch and gets a failed result naming the step; the others go on. fp16 (whose GradScaler skips the step for
everyone when any gradient overflows) and 8-bit Adam (quantised in blocks that would span subjects) would break
that isolation and are refused, as are full fine-tunes and text-encoder training (one model per subject).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dreambooth_lib import models, storage
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError, DreamboothError
from dreambooth_lib.models import lora
from dreambooth_lib.train.results import SubjectOutcome
from dreambooth_lib.train.subjects import TrainSubject

log = logging.getLogger(__name__)

MAX_PACK_SIZE = 16
# Measured on an H200: an SD-1.5 LoRA step at 512 px with 1+1 images peaks at 7.0 GiB, of which the fp32 UNet
# is 3.4 GiB; a packed subject adds its rows' activations. Rounded up, with room for the allocator.
PACKED_SUBJECT_BYTES_512 = 4 * 2**30  # one subject, 1 subject + 1 prior image at 512 px
PACKED_FIXED_BYTES = 6 * 2**30  # the frozen UNet, the CUDA context and workspace

# Transitional names of the batch code (runs/batch) for the general ones.
PackedSubject = TrainSubject
PackedResult = SubjectOutcome


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


def check_packable(config: TrainConfig) -> None:
    """Refuse, naming every cause at once, what would make packed subjects differ from their single runs."""
    refusals = [
        (config.mode != "lora", "packed training trains LoRA adapters; set train.mode: lora"),
        (
            config.train_text_encoder,
            "packed training adapts the denoiser only; set train.train_text_encoder: false",
        ),
        (
            config.mixed_precision == "fp16",
            "packed training cannot use fp16 (its GradScaler skips the step of every packed subject when one "
            "overflows); use train.mixed_precision: bf16 (or auto)",
        ),
        (
            config.use_8bit_adam,
            "packed training cannot use 8-bit Adam (its quantisation blocks span subjects); set "
            "train.use_8bit_adam: false",
        ),
    ]
    messages = [message for refused, message in refusals if refused]
    if messages:
        raise ConfigError("; ".join(messages) + "; or train such subjects one at a time (pack_size: 1)")


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
    """Where a peft LoRA layer sat in the denoiser and the grouped layer that replaces it while training."""

    parent: torch.nn.Module
    child: str
    peft_layer: torch.nn.Module
    grouped: GroupedLoRALinear


class GroupedAdapters:
    """The K adapters of a pack inside the denoiser: made from its peft LoRA layers, each of the K starting as the
    adapter a single run would make, and put back into those layers one subject at a time for export."""

    def __init__(self, denoiser: torch.nn.Module, num_adapters: int):
        self.router = AdapterRouter()
        self.slots: list[_Slot] = []
        for name, module in list(denoiser.named_modules()):
            if not (hasattr(module, "lora_A") and lora.ADAPTER_NAME in getattr(module, "lora_A", {})):
                continue
            a = module.lora_A[lora.ADAPTER_NAME].weight.detach()
            b = module.lora_B[lora.ADAPTER_NAME].weight.detach()
            grouped = GroupedLoRALinear(
                module.base_layer,
                a.unsqueeze(0).repeat(num_adapters, 1, 1),
                b.unsqueeze(0).repeat(num_adapters, 1, 1),
                module.scaling[lora.ADAPTER_NAME],
                self.router,
            )
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name)
            setattr(parent, child, grouped)
            self.slots.append(_Slot(parent, child, module, grouped))
        if not self.slots:
            raise RuntimeError("no LoRA layers found in the denoiser; add its LoRA adapters first")

    def ungroup(self) -> None:
        """Put the peft layers back in the denoiser (after training; then `load(k)` fills them)."""
        self.router.index = None
        for s in self.slots:
            setattr(s.parent, s.child, s.peft_layer)

    @torch.no_grad()
    def load(self, k: int) -> None:
        """Copy adapter k into the peft layers, so the denoiser is subject k's LoRA model."""
        for s in self.slots:
            s.peft_layer.lora_A[lora.ADAPTER_NAME].weight.copy_(s.grouped.lora_A[k])
            s.peft_layer.lora_B[lora.ADAPTER_NAME].weight.copy_(s.grouped.lora_B[k])


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


# --- entry points --------------------------------------------------------------------------------------------------


def run_packed(
    base_model: str,
    subjects: list[TrainSubject],
    config: TrainConfig,
    allow_pickle: bool = False,
    checkpoint_root: str | None = None,
    resume: bool = False,
) -> list[SubjectOutcome]:
    """Train each subject's LoRA adapter on `base_model`, all in one batch; write each subject's out/model and
    out/train_summary.json exactly as its single run would. A subject whose loss turns non-finite gets a failed
    outcome; the others finish. Configuration errors (for any subject) raise ConfigError before training.

    Checkpoints go to `<checkpoint_root>/<key of the pack's content>` (default root: checkpoints/ beside the first
    subject's out), so a preempted pack rerun with resume=True continues from its newest complete checkpoint."""
    from dreambooth_lib.train.loop import train_subjects

    check_packable(config)
    if not subjects:
        raise ConfigError("run_packed: no subjects given")
    for what in ("name", "out"):
        values = [getattr(s, what) for s in subjects]
        if len(set(values)) != len(values):
            raise ConfigError(f"packed subjects must have distinct {what}s; got {values}")
    root = checkpoint_root or storage.join(str(subjects[0].out).rstrip("/").rsplit("/", 1)[0], "checkpoints")
    return train_subjects(
        base_model, subjects, config, checkpoint_root=root, resume=resume, allow_pickle=allow_pickle
    )


def _isolated(group: list[TrainSubject], train) -> list[SubjectOutcome]:
    """`train()`'s outcomes, or a failed outcome for each subject of `group` if it raised: the isolation boundary
    of a batch, where a pack-wide failure (a bad config, out of memory) fails that pack's subjects only."""
    try:
        return train()
    except Exception as err:
        log.exception("training %s failed", [s.name for s in group])
        message = str(err) if isinstance(err, DreamboothError) else f"{type(err).__name__}: {err}"
        return [SubjectOutcome(name=s.name, ok=False, error=message) for s in group]


def train_packed_subjects(
    base_model: str,
    subjects: list[TrainSubject],
    config: TrainConfig,
    pack_size: int | None = None,
    allow_pickle: bool = False,
    resume: bool = True,
    work_dir: str | None = None,
) -> list[SubjectOutcome]:
    """The batch entry point: train `subjects` (one base model) in packs of `pack_size` (None: as many as the
    device holds, `default_pack_size`); outcomes in the order given. A subject's own failure, or a pack's, is
    returned as a failed outcome, never raised, so one bad subject never sinks the batch.

    Each pack checkpoints under `work_dir` (default: checkpoints/ beside the first subject's out), keyed by the
    pack's content, and with resume (the default: a preempted node's rerun) continues from its newest complete
    checkpoint. Full fine-tunes, text-encoder training and pack_size 1 train each subject alone."""
    from dreambooth_lib.train.loop import train_subjects

    if pack_size is None:
        pack_size = default_pack_size(
            config.device, config.resolution, config.batch_size, base_model=base_model
        )
    if pack_size < 1:
        raise ConfigError(f"pack_size must be at least 1, got {pack_size}")
    alone = pack_size == 1 or config.mode != "lora" or config.train_text_encoder
    outcomes: list[SubjectOutcome] = []
    if alone:  # each subject keeps its checkpoints beside its own output, as `train.run` does
        for s in subjects:
            root = storage.join(s.out, "checkpoints")
            outcomes += _isolated([s], lambda s=s, root=root: train_subjects(
                base_model, [s], config, checkpoint_root=root, resume=resume, allow_pickle=allow_pickle
            ))  # fmt: skip
        return outcomes
    for start in range(0, len(subjects), pack_size):
        pack = subjects[start : start + pack_size]
        outcomes += _isolated(pack, lambda pack=pack: run_packed(
            base_model, pack, config, allow_pickle=allow_pickle, checkpoint_root=work_dir, resume=resume
        ))  # fmt: skip
    return outcomes
