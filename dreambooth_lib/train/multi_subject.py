"""Packed multi-subject LoRA training: K subjects, K adapters, one process, one denoiser batch per step.

A LoRA step on one subject (1 subject + 1 prior image) leaves a large GPU mostly idle: the frozen denoiser's
weights are read once per forward whatever the batch. Packing trains K subjects in one batch, each row through
its own subject's adapter (grouped_lora.py). A subject's prior rows go through its own adapter too: in Eq. 2 they
regularise that subject's model.

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

import torch

from dreambooth_lib import models, storage
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError, DreamboothError
from dreambooth_lib.train.loop import train_subjects
from dreambooth_lib.train.results import SubjectOutcome
from dreambooth_lib.train.subjects import TrainSubject

log = logging.getLogger(__name__)

MAX_PACK_SIZE = 16
# Measured on an H200: an SD-1.5 LoRA step at 512 px with 1+1 images peaks at 7.0 GiB, of which the fp32 UNet
# is 3.4 GiB; a packed subject adds its rows' activations. Rounded up, with room for the allocator.
PACKED_SUBJECT_BYTES_512 = 4 * 2**30  # one subject, 1 subject + 1 prior image at 512 px
PACKED_FIXED_BYTES = 6 * 2**30  # the frozen UNet, the CUDA context and workspace


def default_pack_size(
    device: str | torch.device = "auto",
    resolution: int = 512,
    batch_size: int = 1,
    max_pack: int = MAX_PACK_SIZE,
    base_model: str | None = None,
) -> int:
    """Subjects to pack on `device`: 1 on CPU (nothing is gained: the CPU is busy with one), else as many as the
    free CUDA memory holds by the per-subject estimate above (activations scale with pixels and rows, and both
    terms with the denoiser's size relative to SD 1.5's UNet, read from `base_model`'s safetensors headers: SDXL ~3x)."""
    device = torch.device(models.resolve_device(str(device)))
    if device.type != "cuda":
        return 1
    scale = 1.0
    if base_model is not None:
        scale = max(1.0, models.denoiser_parameter_count(base_model) / models.SD15_UNET_PARAMETERS)
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
