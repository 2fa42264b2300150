"""What training reports: a finished subject's TrainResult (also written as out/train_summary.json), or why not."""

from __future__ import annotations

from pydantic import BaseModel

from dreambooth_lib.config import TrainConfig


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
    family: str  # the base model's family (models.families): sd, sdxl, ...
    model_uri: str
    mode: str
    resumed_from: int | None  # the checkpoint step this call continued from
    # where this run's checkpoints live (keyed by its content); deleted after success unless kept
    checkpoint_dir: str
    num_instance_images: int
    num_prior_images: int
    num_subjects_trained_together: int  # 1, or the K subjects of its pack
    device: str
    precision: str
    # train.select: the rule, every probe's scores, the exported (chosen) step; None when not asked for
    selection: dict | None = None


class SubjectOutcome(BaseModel):
    """What happened to one subject of a run: its TrainResult, or the error (and step) that stopped it."""

    name: str
    ok: bool
    model_uri: str | None = None
    error: str | None = None
    failed_step: int | None = None
    train: TrainResult | None = None
