"""Register the model (immutable, versioned, with lineage) if it passed the gate: an adapter over
dreambooth_lib.registry."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_model(
    registry_uri: str,
    subject_name: str,
    class_noun: str,
    trained_model: Input[Model],
    evaluation: Input[Artifact],
    instance_images: Input[Dataset],
    model_card: Output[Markdown],
    require_gate: bool = True,
) -> NamedTuple("RegisterOutputs", model_uri=str, version=str):
    """Copy the model with its metrics and lineage into the registry; a failed gate fails this task (GateFailed)."""
    from dreambooth_lib import registry, storage

    registered = registry.register_from_dirs(
        registry_uri,
        subject=subject_name,
        class_noun=class_noun,
        train_dir=trained_model.path,
        eval_dir=evaluation.path,
        ingest_dir=instance_images.path,
        require_gate=require_gate,
    )
    record = registered.model_dump(mode="json")
    storage.copy(registered.card_uri, model_card.path)  # the registry's model card, as the UI's Markdown view
    model_card.metadata.update(
        {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) or v is None}
    )
    print(f"registered {subject_name} v{registered.version}: {registered.model_uri}")
    return (registered.model_uri, str(registered.version))
