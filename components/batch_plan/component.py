"""Plan a batch: read the subjects manifest, assign distinct identifiers, list the distinct classes."""

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

    Identifiers are chosen here, one after another, so subjects trained in parallel never share one (each
    excludes the ones before it and those already in the registry). An invalid entry is recorded as failed in
    `<batch_root>/<job_id>/status/` and left out; the others go on. A manifest that cannot be read fails the run.
    Returns the subjects, each with its `identifier`, the `base_model_digest` and the `prior_root` (a single
    list output: kfp.local iterates a ParallelFor only over a task's single `Output`).
    """
    from dreambooth_lib import identifier, models, storage
    from dreambooth_lib.config import IdentifierConfig, Subject, load_config_text, parse_config
    from dreambooth_lib.errors import ConfigError, DreamboothError

    if not storage.exists(manifest_uri):
        raise ConfigError(f"{manifest_uri}: manifest not found; give a JSON/YAML file of subjects")
    data = load_config_text(storage.read_text(manifest_uri), manifest_uri)
    entries = data.get("subjects") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{manifest_uri}: expected a non-empty list under 'subjects' (name, class_noun, images)"
        )
    status_dir = storage.join(batch_root, job_id, "status")
    base_config = parse_config(IdentifierConfig, identifier_options, "identifier_options")
    used: set[str] = set()
    seen: set[str] = set()
    subjects, failed = [], []
    for i, entry in enumerate(entries):
        name = str(entry.get("name", f"entry-{i}")) if isinstance(entry, dict) else f"entry-{i}"
        try:
            if not isinstance(entry, dict):
                raise ConfigError(f"{manifest_uri}: subjects[{i}] is not a mapping")
            fixed = entry.get("identifier")
            subject = parse_config(
                Subject,
                {k: v for k, v in entry.items() if k != "identifier"},
                f"{manifest_uri}: subjects[{i}]",
            )
            if subject.name in seen:
                raise ConfigError(f"{manifest_uri}: subjects[{i}]: name {subject.name!r} appears twice")
            seen.add(subject.name)
            config = base_config.model_copy(update={"identifier": fixed}) if fixed else base_config
            chosen = identifier.run(
                base_model,
                subject.class_noun,
                config,
                exclude=used,
                registry_uri=registry_uri or None,
                allow_pickle=allow_pickle,
            )
        except DreamboothError as err:
            failed.append(name)
            record = {"subject": name, "status": "failed", "step": "plan", "error": str(err)}
            storage.write_json(storage.join(status_dir, f"{name}.json"), record)
            print(f"subject {name}: left out: {err}")
            continue
        used.add(chosen.identifier)
        subjects.append({**subject.model_dump(mode="json"), "identifier": chosen.identifier})
    classes = sorted({s["class_noun"] for s in subjects})
    digest = models.model_digest(base_model, allow_pickle=allow_pickle)
    prior_root = prior_root or storage.join(batch_root, "priors")
    subjects = [{**s, "base_model_digest": digest, "prior_root": prior_root} for s in subjects]
    record = {"subjects": subjects, "failed": failed, "classes": classes, "base_model_digest": digest}
    storage.write_json(plan.path, record)
    plan.metadata.update({"num_subjects": len(subjects), "num_failed": len(failed), "classes": classes})
    return subjects
