"""Resuming a run: the content key of its checkpoints, the check that a checkpoint belongs to this run, and the
run's whole state (trainer, per-subject losses and dropped subjects) to and from a checkpoint.

Checkpoints live under `<checkpoint_root>/<checkpoint_key>/`: the key hashes everything that changes what a step
computes (the config fields below, the base model's digest, each subject's identifier, class, photos and prior
set), so a retried or resubmitted task with the same content finds its checkpoints on a durable root, and any
other run never does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from dreambooth_lib import storage
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import StorageError, TrainingError
from dreambooth_lib.train import checkpoint
from dreambooth_lib.train.subjects import TrainSubject
from dreambooth_lib.train.tracking import LossTracker
from dreambooth_lib.train.trainer import Trainer

# TrainConfig fields that change what a step computes: a checkpoint only resumes a run that agrees on all of them.
# (steps may grow; logging, checkpointing, device and compile settings may change between attempts.)
RESUME_MUST_MATCH = (
    "mode",
    "learning_rate",
    "prior_loss_weight",
    "prior_mode",
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
    "base_precision",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "guidance_scale",
    "lora_target_modules",
    "select",  # the probes and the rule decide which step is exported, and when training stops
)

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What the loop carries from step to step besides the trainer: per-subject logged losses and the subjects
    dropped for a non-finite loss (subject -> step)."""

    losses: list[list[tuple[int, float]]]
    failed: dict[int, int] = field(default_factory=dict)
    step: int = 0  # the last finished step
    resumed_from: int | None = None
    selection: dict | None = None  # train.select's probes and chosen steps (select.Selector.state)


def fingerprint(
    config: TrainConfig,
    base_digest: str,
    subjects: list[TrainSubject],
    subjects_images: list[tuple[list[str], list[str]]],
) -> dict:
    """The settings a checkpoint must share with this run, flat, so a mismatch names the subject and field."""
    flat: dict = {
        "subjects": [s.name for s in subjects],
        "config": config.model_dump(mode="json", include=set(RESUME_MUST_MATCH)),
        "base_model_digest": base_digest,
    }
    for k, (s, (instance, prior)) in enumerate(zip(subjects, subjects_images, strict=True)):
        flat |= {
            f"subject {s.name} ({k}) identifier": s.identifier,
            f"subject {s.name} ({k}) class_noun": s.class_noun,
            f"subject {s.name} ({k}) instance_images": [storage.basename(u) for u in instance],
            f"subject {s.name} ({k}) num_prior_images": len(prior),
        }
    return flat


def checkpoint_key(
    fingerprint: dict, subjects: list[TrainSubject], subjects_images: list[tuple[list[str], list[str]]]
) -> str:
    """The fingerprint plus the bytes of every subject's photos and prior set (its content-addressed key when
    known, else its images' bytes)."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for s, (instance, prior) in zip(subjects, subjects_images, strict=True):
        for uri in instance:
            digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
        if s.prior_key:
            digest.update(f"prior:{s.prior_key}:{len(prior)}".encode())
        else:
            for uri in prior:
                digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    return "train-" + digest.hexdigest()[:20]


def check_fingerprint(uri: str, saved: dict, current: dict) -> None:
    diffs = [
        f"config.{k}: checkpoint {v!r}, now {current['config'].get(k)!r}"
        for k, v in saved["config"].items()
        if current["config"].get(k) != v
    ]
    diffs += [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in dict.fromkeys([*saved, *current])  # both sides' keys, in order
        if k != "config" and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise TrainingError(
            f"{uri}: cannot resume, this run differs from the checkpointed one ({'; '.join(diffs)}); "
            "resume with the same settings, or train into a new out folder"
        )


def save(root: str, t: Trainer, tracker: LossTracker, state: LoopState, fingerprint: dict, keep: int) -> None:
    """Checkpoint the run at `state.step`, then prune to the newest `keep`. A checkpoint that cannot be written
    (storage still failing after its retries) costs only the steps a resume would redo: training goes on, and the
    folder it left has no manifest, so resume never picks it (checkpoint.save_checkpoint writes the manifest last).
    """
    info = {
        "fingerprint": fingerprint,
        "losses": state.losses,
        "failed": {str(k): v for k, v in state.failed.items()},
        "selection": state.selection,
        **tracker.state(),
    }
    snap = checkpoint.snapshot(
        state.step, t.named_trainable, t.optimizer, info, generators=t.generators, scaler=t.scaler
    )
    try:
        checkpoint.save_checkpoint(root, snap)
    except StorageError as err:
        log.warning("step %d: checkpoint not saved, training goes on (%s)", state.step, err)
        return  # nothing is pruned: the older checkpoints are what a resume has
    try:
        checkpoint.prune_checkpoints(root, keep)
    except StorageError as err:  # an older checkpoint stays a while longer; prune runs again at the next one
        log.warning("step %d: older checkpoints not pruned (%s)", state.step, err)


def restore(uri: str, t: Trainer, tracker: LossTracker, fingerprint: dict, steps: int) -> LoopState:
    """Put the checkpoint at `uri` back into a freshly set-up trainer and tracker; the loop state it held."""
    ckpt = checkpoint.load_checkpoint(uri)
    check_fingerprint(uri, ckpt.info["fingerprint"], fingerprint)
    if ckpt.step > steps:
        raise TrainingError(f"{uri}: is at step {ckpt.step}, past train.steps={steps}; raise steps")
    checkpoint.restore(ckpt, t.named_trainable, t.optimizer, generators=t.generators, scaler=t.scaler)
    tracker.load_state(ckpt.info)
    failed = {int(k): int(v) for k, v in ckpt.info["failed"].items()}
    t.active = [k for k in range(t.num_subjects) if k not in failed]
    return LoopState(
        losses=[[(int(s), float(v)) for s, v in subject] for subject in ckpt.info["losses"]],
        failed=failed,
        step=ckpt.step,
        resumed_from=ckpt.step,
        selection=ckpt.info.get("selection"),
    )
