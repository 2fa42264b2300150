"""Packed LoRA training: the batch's LoRA subjects trained together, K adapters per UNet batch, before the
subject loop, each into its own `<run_dir>/train` where its `run_subject` finds the model and reuses it.

A LoRA step of one subject leaves a large GPU mostly idle; `multi_subject.train_packed_subjects` trains up to
`pack_size` subjects in one UNet batch, each exactly as its own run would. Full fine-tunes, text-encoder training,
a pack size of 1 and any subject that fails here are left to `run_subject`, which trains them one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from dreambooth_lib import artifacts, storage
from dreambooth_lib.config import RunConfig, TrainConfig
from dreambooth_lib.errors import DreamboothError
from dreambooth_lib.runs.batch.plan import PlannedSubject
from dreambooth_lib.runs.batch.subject import BatchSettings, subject_config, subject_run_dir

log = logging.getLogger(__name__)


class PackStatus(BaseModel):
    """One subject of `train_pack`: trained in a pack, or left for `run_subject` to train alone (and why)."""

    subject: str
    packed: bool
    model_uri: str | None = None
    reason: str | None = None


def packed_record_uri(batch_root: str, job_id: str) -> str:
    """`<batch>/packed.json`: beside, not inside, status/ (whose every file is a SubjectStatus)."""
    return storage.join(batch_root, job_id, artifacts.PACKED_RECORD_NAME)


def train_pack(
    subjects: Iterable[PlannedSubject | Mapping[str, Any]],
    base_model: str,
    batch_root: str,
    job_id: str,
    run_options: Mapping[str, Any] | None = None,
    pack_size: int = 0,
    registry_uri: str | None = None,
    allow_pickle: bool = False,
) -> list[PackStatus]:
    """Train the batch's LoRA subjects together, each into `<run_dir>/train`, before the subject loop runs.

    `pack_size` 0: as many as the GPU's free memory holds (`multi_subject.default_pack_size`). Each subject is
    ingested and its class's prior set found (the class loop made it: `prior.run` finds it in the shared cache)
    with its own RunConfig, so `run_subject` later sees the same inputs and reuses the model. Does nothing
    (returns []) for full fine-tunes, text-encoder training, a pack size of 1 or fewer than 2 subjects: the
    subject loop then trains one subject per task, as without packing. A subject that fails here is only left
    untrained: its `run_subject` trains it alone or reports its failure. Writes the statuses to `packed.json` of
    the batch. Raises nothing for a subject's failure.
    """
    from dreambooth_lib.runs import personalize
    from dreambooth_lib.train import SubjectOutcome, TrainSubject
    from dreambooth_lib.train import multi_subject as packed

    planned = [PlannedSubject.of(s) for s in subjects]
    configs: dict[str, RunConfig] = {}
    statuses: dict[str, PackStatus] = {}
    settings = BatchSettings(base_model, run_options, registry_uri, allow_pickle)
    for s in planned:
        run_dir = subject_run_dir(batch_root, job_id, s.name)
        try:
            configs[s.name] = subject_config(s, run_dir, settings)
        except Exception as err:  # its run_subject reports the same error
            statuses[s.name] = PackStatus(subject=s.name, packed=False, reason=_reason(err))
    if not configs:
        return []
    # the settings every subject trains with (λ 0 without a prior): its run_subject compares them to reuse the model
    train_config = personalize.training_config(next(iter(configs.values())))[0]
    size = _pack_size(train_config, len(configs), pack_size, base_model)
    if size < 2:
        return []

    to_pack: list[TrainSubject] = []
    priors: dict[str, Any] = {}  # class noun -> its PriorResult (None without a prior): one look-up per class
    for s in planned:
        if s.name in configs:
            try:
                to_pack.append(_packed_subject(s, configs[s.name], priors))
            except Exception as err:  # left to its run_subject, which reports it
                statuses[s.name] = PackStatus(subject=s.name, packed=False, reason=_reason(err))
    if to_pack:
        try:
            results = packed.train_packed_subjects(
                base_model, to_pack, train_config, pack_size=size, allow_pickle=allow_pickle
            )
        except Exception as err:  # e.g. a bad pack_size: every subject trains alone instead
            results = [SubjectOutcome(name=p.name, ok=False, error=_reason(err)) for p in to_pack]
        for r in results:
            statuses[r.name] = PackStatus(subject=r.name, packed=r.ok, model_uri=r.model_uri, reason=r.error)
    ordered = [statuses[s.name] for s in planned if s.name in statuses]
    storage.write_json(
        packed_record_uri(batch_root, job_id),
        {"pack_size": size, "subjects": [p.model_dump(mode="json", exclude_none=True) for p in ordered]},
    )
    return ordered


def _pack_size(train_config: TrainConfig, num_subjects: int, pack_size: int, base_model: str) -> int:
    """How many subjects share a UNet batch; below 2 (with the reason logged) packing is off."""
    from dreambooth_lib.train import multi_subject as packed

    if train_config.mode != "lora" or train_config.train_text_encoder:
        log.info("packing off: train.mode %s, train_text_encoder %s", train_config.mode,
                 train_config.train_text_encoder)  # fmt: skip
        return 0
    size = pack_size or packed.default_pack_size(
        train_config.device, train_config.resolution, train_config.batch_size, base_model=base_model
    )
    if size < 2 or num_subjects < 2:
        log.info("packing off: pack size %d, %d subjects", size, num_subjects)
        return 0
    return size


def _packed_subject(subject: PlannedSubject, config: RunConfig, priors: dict[str, Any]):
    """The subject ingested into its run directory, with its class's prior set (found in the shared cache, once
    per class: `priors`)."""
    from dreambooth_lib import ingest
    from dreambooth_lib.runs import personalize
    from dreambooth_lib.train import TrainSubject

    ingest_dir = storage.join(config.run_dir, "ingest")
    ingest.run(subject.images, ingest_dir, config.ingest, class_noun=subject.class_noun,
               subject_kind=subject.kind, consent=subject.consent)  # fmt: skip
    if subject.class_noun not in priors:
        samples = personalize.training_config(config)[1].samples
        priors[subject.class_noun] = personalize.class_prior(config) if samples else None
    prior_result = priors[subject.class_noun]
    return TrainSubject(
        name=subject.name,
        instance_dir=ingest_dir,
        prior_dir=prior_result.uri if prior_result else None,
        identifier=subject.identifier,
        class_noun=subject.class_noun,
        live=subject.live,
        out=storage.join(config.run_dir, "train"),
        prior_images=list(prior_result.images) if prior_result else None,
    )


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, DreamboothError) else f"{type(err).__name__}: {err}"
