"""One subject of a batch, end to end in one task: a thin adapter over dreambooth_lib.runs.batch.subject.run_subject."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def personalize_subject(
    subject: dict,
    base_model: str,
    base_model_digest: str,
    prior_root: str,
    batch_root: str,
    job_id: str,
    status: Output[Markdown],
    resolution: int,
    steps: int,
    prior_loss_weight: float,
    prior_size: int,
    mode: str,
    eval_prompts: list = [],  # noqa: B006 - KFP reads the literal default into the spec
    gate_thresholds: dict = {},  # noqa: B006
    prior_options: dict = {},  # noqa: B006
    run_options: dict = {},  # noqa: B006
    registry_uri: str = "",
    allow_pickle: bool = False,
) -> NamedTuple("SubjectOutputs", ok=bool, run_dir=str):
    """ingest → train (prior from the shared cache) → evaluate → register, via dreambooth_lib.runs.personalize.

    One task per subject, not one per step: in a batch, a task that fails stops the whole DAG on Argo, so the
    subject's steps run in one process whose failure `run_subject` returns as its status, written to
    `<batch_root>/<job_id>/status/<subject>.json` and this task's `status` artifact. The prior set was made
    by the class loop before; with the same settings and root it is found in the cache, not sampled again.
    `prior_options` must equal the class loop's, so the cache key matches. `prior_size` or `prior_loss_weight`
    0 trains without a prior. `run_options` holds any other RunConfig sections (ingest, train, eval, prior,
    sample_prompts, ...). A LoRA model the pack step (batch_train_packed) already trained into its run
    directory is used as is. The training parameters have no defaults here: batch_personalize's are the ones.
    """
    from dreambooth_lib import storage
    from dreambooth_lib.runs.batch.plan import PlannedSubject
    from dreambooth_lib.runs.batch.status import status_dir, write_status
    from dreambooth_lib.runs.batch.subject import (
        BatchSettings,
        run_subject,
        subject_run_dir,
        subject_run_values,
    )
    from dreambooth_lib.runs.batch.summary import render_status

    planned = PlannedSubject.model_validate(
        {**subject, "base_model_digest": base_model_digest, "prior_root": prior_root}
    )
    values = subject_run_values(
        run_options, resolution=resolution, steps=steps, prior_loss_weight=prior_loss_weight,
        prior_size=prior_size, prior_root=prior_root, mode=mode, eval_prompts=eval_prompts,
        gate_thresholds=gate_thresholds, prior_options=prior_options,
    )  # fmt: skip

    run_dir = subject_run_dir(batch_root, job_id, planned.name)
    result = run_subject(
        planned, run_dir, BatchSettings(base_model, values, registry_uri or None, allow_pickle)
    )
    write_status(status_dir(batch_root, job_id), result)
    storage.write_text(status.path, render_status(result))
    status.metadata.update(
        {"subject": result.subject, "status": result.status, "identifier": result.identifier,
         "error": result.error, "run_dir": run_dir}
    )  # fmt: skip
    print(f"subject {result.subject}: {result.status}" + (f": {result.error}" if result.error else ""))
    return (result.ok, run_dir)
