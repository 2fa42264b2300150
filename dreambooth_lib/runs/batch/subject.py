"""One subject of a batch, end to end in one process: its run directory, its RunConfig, and `run_subject`.

`run_subject` calls `personalize.run` (reusing a model its pack trained) and turns any failure of the subject's
own into its `SubjectStatus`, never an exception: on Argo one failed task stops the DAG from scheduling the other
subjects.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dreambooth_lib import artifacts, storage
from dreambooth_lib.config import RunConfig, parse_config
from dreambooth_lib.errors import GateFailed
from dreambooth_lib.runs import defaults
from dreambooth_lib.runs.batch.plan import PlannedSubject
from dreambooth_lib.runs.batch.status import SubjectStatus

log = logging.getLogger(__name__)


def subject_run_dir(batch_root: str, job_id: str, name: str) -> str:
    return storage.join(batch_root, job_id, "subjects", name)


def subject_run_values(
    run_options: Mapping[str, Any] | None,
    *,
    prior_root: str,
    resolution: int = defaults.RESOLUTION,
    steps: int = defaults.STEPS,
    prior_loss_weight: float = defaults.PRIOR_LOSS_WEIGHT,
    prior_size: int = defaults.PRIOR_SIZE,
    mode: str = defaults.BATCH_MODE,
    eval_prompts: Iterable[str] = (),
    gate_thresholds: Mapping[str, Any] | None = None,
    prior_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The batch pipeline's parameters laid onto `run_options` (a deep copy) as RunConfig sections: one place, so
    the pack step and the subject step build the very same RunConfig (and find the same prior set)."""
    values = json.loads(json.dumps(dict(run_options or {})))
    values.setdefault("ingest", {})["resolution"] = resolution
    values["prior"] = {
        **values.get("prior", {}),
        **dict(prior_options or {}),
        "num_images": prior_size,
        "root": prior_root,
    }
    values.setdefault("train", {}).update(
        steps=steps, prior_loss_weight=prior_loss_weight, mode=mode, resolution=resolution
    )
    eval_values = values.setdefault("eval", {})
    if eval_prompts:
        eval_values["prompts"] = list(eval_prompts)
    eval_values["gate"] = {**eval_values.get("gate", {}), **dict(gate_thresholds or {})}
    return values


@dataclass(frozen=True)
class BatchSettings:
    """What every subject of a batch runs with: the base model, the other RunConfig sections (`run_options`: ingest,
    prior, train, eval, sample_prompts, ...), the registry, and whether pickled weights may be loaded."""

    base_model: str
    run_options: Mapping[str, Any] | None = None
    registry_uri: str | None = None
    allow_pickle: bool = False


def subject_config(subject: PlannedSubject, run_dir: str, settings: BatchSettings) -> RunConfig:
    """The RunConfig of one subject: the batch's settings plus its subject, identifier and run dir. A configuration
    no run of it would accept (`personalize.check_config`) is refused here, before any work."""
    from dreambooth_lib.runs import personalize

    values = dict(settings.run_options or {})
    values.update(
        base_model=settings.base_model,
        run_dir=run_dir,
        allow_pickle=settings.allow_pickle,
        subject=subject.subject().model_dump(),
        registry={"uri": settings.registry_uri} if settings.registry_uri else None,
        identifier={**values.get("identifier", {}), "identifier": subject.identifier},
    )
    config = parse_config(RunConfig, values, f"subject {subject.name}: run_options")
    personalize.check_config(config)
    return config


def run_subject(subject: PlannedSubject, run_dir: str, settings: BatchSettings) -> SubjectStatus:
    """Train, evaluate and register one subject; any failure of its own is returned as its status, not raised.
    A model that `train_pack` already trained into `<run_dir>/train` for this configuration is used, not trained
    again.
    """
    from dreambooth_lib.runs import personalize

    status = SubjectStatus(
        subject=subject.name,
        status="failed",
        class_noun=subject.class_noun,
        identifier=subject.identifier,
        run_dir=run_dir,
        base_model_digest=subject.base_model_digest,
    )
    try:
        config = subject_config(subject, run_dir, settings)
        # resume: a rerun of this task (a preempted pod) continues from the run's checkpoints in the durable run dir
        result = personalize.run(config, resume=True, reuse_training=True)
        status.fill_from_result(result.model_dump(mode="json"))
        status.packed = result.reused_training or None
        status.status = "registered" if result.registered else "trained"
    except GateFailed as err:
        # The run's artifacts are kept; its run_result.json holds the metrics that failed the gate.
        status.status, status.error = "gate failed", str(err)
        result_uri = storage.join(run_dir, artifacts.RUN_RESULT_NAME)
        if storage.exists(result_uri):
            status.fill_from_result(storage.read_json(result_uri))
    except Exception as err:  # the isolation boundary of one subject: its failure is reported, not raised
        log.error("subject %s failed:\n%s", subject.name, traceback.format_exc())
        status.status, status.error = "failed", f"{type(err).__name__}: {err}"
    return status
