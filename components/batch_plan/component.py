"""Plan a batch: a thin adapter over dreambooth_lib.runs.batch.manifest and .plan (manifest → subjects with distinct
identifiers)."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_batch(
    manifest_uri: str,
    base_model: str,
    batch_root: str,
    job_id: str,
    plan: Output[Artifact],
    registry_uri: str = "",
    prior_root: str = "",
    identifier_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    allow_pickle: bool = False,
) -> list:
    """The manifest (JSON/YAML, local or gs://): `{"subjects": [{name, class_noun, images, live}, ...]}` or a list.

    `load_manifest` validates it and `plan_batch` (dreambooth_lib.runs.batch) chooses the identifiers one after another, so
    subjects trained in parallel never share one. A rejected entry is written as a failed status to
    `<batch_root>/<job_id>/status/` and left out; a manifest that cannot be read fails the run. Returns the
    planned subjects (a single list output: kfp.local iterates a ParallelFor only over a task's single `Output`).
    """
    from dreambooth_lib import storage
    from dreambooth_lib.config import IdentifierConfig, parse_config
    from dreambooth_lib.runs.batch.manifest import load_manifest
    from dreambooth_lib.runs.batch.plan import plan_batch as plan_subjects
    from dreambooth_lib.runs.batch.status import status_dir, write_status

    config = parse_config(IdentifierConfig, identifier_options, "identifier_options")
    manifest = load_manifest(manifest_uri)
    result = plan_subjects(
        manifest,
        base_model,
        batch_root,
        identifier_config=config,
        registry_uri=registry_uri or None,
        prior_root=prior_root or None,
        allow_pickle=allow_pickle,
    )
    for status in result.failed:
        write_status(status_dir(batch_root, job_id), status)
        print(f"subject {status.subject}: left out: {status.error}")
    storage.write_json(plan.path, result.model_dump(mode="json"))
    plan.metadata.update(
        {"num_subjects": len(result.subjects), "num_failed": len(result.failed), "classes": result.classes}
    )
    # a KFP parameter holds no null: a subject without a consent record leaves the key out
    return [s.model_dump(mode="json", exclude_none=True) for s in result.subjects]
