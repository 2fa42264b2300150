"""Fine-tuning with prior preservation (the paper's Eq. 2): one loop for one subject or K packed subjects.

`train_subjects` reads top to bottom like nanoGPT's train.py: set-up (load, encode the data once, maybe resume),
the loop (the step, logging, checkpointing), then the export of every subject that finished. One subject is
K = 1: `run` is that loop for one subject, and packed multi-subject training (multi_subject.py) is the same loop
with K adapters in one batch.

Speed by design, not by flags in the loop: the VAE and the frozen text encoders run once before training; a step
is one denoiser forward/backward over every subject's and prior rows together; the [K] losses are read back (a
device sync) only every `log_every` steps, and non-finite losses are caught on the device. A subject whose loss
turns non-finite is dropped there (nothing of it is exported); the others go on.
"""

from __future__ import annotations

import logging
import time

import torch

from dreambooth_lib import models, storage
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import TrainingError
from dreambooth_lib.models import quantization
from dreambooth_lib.train import checkpoint, cuda_graph, export, select
from dreambooth_lib.train import resume as resuming
from dreambooth_lib.train.results import SubjectOutcome, TrainResult
from dreambooth_lib.train.speed import autocast_dtype
from dreambooth_lib.train.subjects import TrainSubject, subject_images
from dreambooth_lib.train.tracking import LossTracker
from dreambooth_lib.train.trainer import Trainer, setup_trainer

log = logging.getLogger(__name__)


def load_base_for_training(base_model: str, config: TrainConfig, allow_pickle: bool):
    """(device, base model digest, pipeline), with the device's peak-memory counter reset."""
    device = torch.device(models.resolve_device(config.device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_digest = models.model_digest(base_model, allow_pickle=allow_pickle)
    family = models.family_of_model(base_model, allow_pickle=allow_pickle)  # refused before any loading
    quantization.check_base_precision(config.base_precision, device, autocast_dtype(config, device))
    components = {}
    if config.base_precision in quantization.QUANTIZED:
        local = models.resolve_model_dir(base_model, allow_pickle=allow_pickle)
        denoiser = quantization.quantized_denoiser(local, family.denoiser_name, config.base_precision)
        components[family.denoiser_name] = denoiser
    pipe = models.load_pipeline(base_model, allow_pickle=allow_pickle, components=components)
    return device, base_digest, pipe


def train_subjects(
    base_model: str,
    subjects: list[TrainSubject],
    config: TrainConfig,
    *,
    checkpoint_root: str,
    resume: bool = False,
    allow_pickle: bool = False,
) -> list[SubjectOutcome]:
    """Fine-tune `base_model` on every subject at once (K = len(subjects): one model each, one batch); write each
    finished subject's out/model and out/train_summary.json; an outcome per subject, in order.

    Checkpoints go to `<checkpoint_root>/<content key>/` every `checkpoint_every` steps and are deleted once every
    output is written (unless `keep_checkpoints_on_success`). With resume=True the run continues from its newest
    complete checkpoint there; without it, finding one is an error (a new run never overwrites an old one)."""
    started = time.perf_counter()
    label = (lambda s: f"subject {s.name}: ") if len(subjects) > 1 else (lambda s: "")
    images = [subject_images(s, config, label(s)) for s in subjects]
    device, base_digest, pipe = load_base_for_training(base_model, config, allow_pickle)
    fingerprint = resuming.fingerprint(config, base_digest, subjects, images)
    ckpt_root = storage.join(checkpoint_root, resuming.checkpoint_key(fingerprint, subjects, images))
    newest = checkpoint.newest_to_resume(ckpt_root, resume, "delete that folder to start over")
    t = setup_trainer(pipe, subjects, images, config, device)
    tracker = LossTracker(len(subjects), device)
    selector = None
    if config.select is not None:  # the probe's evaluators load before any step: a wrong path fails now
        instance = [i for i, _ in images]
        selector = select.Selector(config.select, subjects, instance, config.resolution, device, allow_pickle)
    state = resuming.LoopState(losses=[[] for _ in subjects])
    if resume and newest:
        state = resuming.restore(newest, t, tracker, fingerprint, config.steps)
        if selector is not None and state.selection is not None:
            stopped = selector.load_state(state.selection, ckpt_root)
            t.active = [k for k in t.active if k not in stopped]
        log.info("resuming from %s (step %d)", newest, state.step)
    log.info(
        "training %s: %d subject(s), %s prior images, %s, %s%s, %d steps",
        config.mode,
        len(subjects),
        "+".join(str(len(p)) for _, p in images),
        device,
        t.speed.precision,
        ", CUDA graph" if t.speed.cuda_graph else "",
        config.steps,
    )

    # --- the loop: the step, logging, checkpointing ---
    step_fn = cuda_graph.make_step_fn(t)  # step.train_step, or the same step as one replayed CUDA graph
    start_step, loop_started = state.step, time.perf_counter()
    probe_started = selector.probe_seconds if selector else 0.0
    if selector is not None and state.step == 0:
        selector.probe(pipe, t, 0)  # the untrained model: the reference of the rule's bounds
    for step in range(start_step + 1, config.steps + 1):
        tracker.add(step_fn(), step)
        state.step = step
        if step % config.log_every == 0 or step == config.steps:
            _drop_non_finite(t, tracker, state, subjects)  # a dropped subject logs no loss
            means = tracker.read()
            for k in t.active:
                state.losses[k].append((step, means[k]))
            log.info("step %d/%d loss %s", step, config.steps, " ".join(f"{means[k]:.5f}" for k in t.active))
        if selector is not None and selector.due(step, config.steps):
            _drop_non_finite(t, tracker, state, subjects)  # a poisoned model is not probed
            for k in selector.probe(pipe, t, step):  # early stop: this subject trains no further
                t.active.remove(k)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            _drop_non_finite(t, tracker, state, subjects)  # a checkpoint never carries a poisoned model on
            # train.select's best weights first: the checkpoint names their step
            if t.active and (selector is None or selector.save_best(ckpt_root)):
                state.selection = selector.state() if selector is not None else None
                resuming.save(ckpt_root, t, tracker, state, fingerprint, config.keep_checkpoints)
        if not t.active:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    probing = (selector.probe_seconds if selector else 0.0) - probe_started
    s_per_step = (time.perf_counter() - loop_started - probing) / max(state.step - start_step, 1)

    # --- export: every subject that finished, then the checkpoints go (nothing is left to resume) ---
    outcomes = _export_all(pipe, t, subjects, images, config, state, base_model, base_digest, started,
                           selector, s_per_step=s_per_step, checkpoint_dir=ckpt_root)  # fmt: skip
    if not config.keep_checkpoints_on_success:
        storage.delete_prefix(ckpt_root)
    return outcomes


def _drop_non_finite(t: Trainer, tracker: LossTracker, state: resuming.LoopState, subjects) -> None:
    bad = tracker.non_finite_steps()
    for k in list(t.active):
        if bad[k] >= 0:
            state.failed[k] = bad[k]
            t.active.remove(k)  # its rows leave the batch; its model stops training and is not exported
            log.warning("subject %s: loss non-finite at step %d; dropped", subjects[k].name, bad[k])


def _export_all(
    pipe, t, subjects, images, config, state, base_model, base_digest, started, selector, **fields
) -> list[SubjectOutcome]:
    if t.grouped is not None:
        t.grouped.ungroup()
    t.denoiser.to("cpu").eval()
    outcomes = []
    for k, subject in enumerate(subjects):
        if k in state.failed:
            outcomes.append(
                SubjectOutcome(
                    name=subject.name,
                    ok=False,
                    failed_step=state.failed[k],
                    error=(
                        f"the loss became non-finite (NaN/inf) at step {state.failed[k]}; nothing was saved as a "
                        "finished model. Lower train.learning_rate, use mixed_precision: bf16 instead of fp16, or "
                        "check this subject's images"
                    ),
                ),  # fmt: skip
            )
            continue
        if selector is not None:
            selector.apply_best(t, k)  # the step the rule chose, not the last one
        if t.grouped is not None:
            t.grouped.load(k)
        result = export.publish(
            subject.out,
            lambda folder, s=subject: export.write_model(folder, pipe, t, s, config, base_model, base_digest),
            started,
            steps=config.steps,
            losses=state.losses[k],
            peak_memory_bytes=models.peak_memory_bytes(t.speed.device),
            config=config,
            identifier=subject.identifier,
            class_noun=subject.class_noun,
            instance_prompt=subject.instance_prompt,
            class_prompt=subject.class_prompt,
            base_model=base_model,
            base_model_digest=base_digest,
            family=t.family.name,
            mode=config.mode,
            resumed_from=state.resumed_from,
            num_instance_images=len(images[k][0]),
            num_prior_images=len(images[k][1]),
            num_subjects_trained_together=len(subjects),
            device=str(t.speed.device),
            precision=t.speed.precision,
            selection=selector.summary(k) if selector is not None else None,
            **fields,
        )
        outcomes.append(SubjectOutcome(name=subject.name, ok=True, model_uri=result.model_uri, train=result))
        log.info("subject %s: model at %s", subject.name, result.model_uri)
    return outcomes


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
    live: bool = False,
) -> TrainResult:
    """Fine-tune `base_model` on one subject (instance_dir) with prior preservation (prior_dir); write out/model
    and out/train_summary.json. Checkpoints go to `<checkpoint_root>/<content key>/` (default root:
    out/checkpoints), so a retried task on an empty disk resumes from a durable root. `prior_key`, the prior set's
    content key, spares hashing its images for that key. A non-finite loss raises TrainingError."""
    subject = TrainSubject(
        instance_dir=instance_dir, prior_dir=prior_dir, identifier=identifier, class_noun=class_noun, out=str(out),
        instance_images=instance_images, prior_images=prior_images, prior_key=prior_key, live=live,
    )  # fmt: skip
    root = checkpoint_root or storage.join(str(out), "checkpoints")
    (outcome,) = train_subjects(
        base_model, [subject], config, checkpoint_root=root, resume=resume, allow_pickle=allow_pickle
    )
    if not outcome.ok:
        raise TrainingError(outcome.error)
    return outcome.train
