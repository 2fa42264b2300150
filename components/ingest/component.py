"""Ingest/validate the subject's photos: a thin adapter over dreambooth_lib.ingest."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest_images(
    images_uri: str,
    images_digest: str,
    resolution: int,
    instance_images: Output[Dataset],
    ingest_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    class_noun: str = "",
    subject_kind: str = "object",
    consent: dict = {},  # noqa: B006
) -> NamedTuple("IngestOutputs", num_images=int, digest=str):
    """Decode, validate and crop the photos under `images_uri` into `instance_images` (NN.png + manifest.json).

    `images_digest` (from fingerprint_inputs) is unused here: it is the cache key of the photos' content.
    `ingest_options` holds any other IngestConfig field (min_side, allow_few, strict, ...). A `subject_kind`
    "person" without a `consent` record ({given_by, date, reference}) fails here, the first step that reads the
    photos, before any GPU task; the record goes into the manifest (and from there into lineage and the card).
    """
    from dreambooth_lib import ingest
    from dreambooth_lib.config import IngestConfig, parse_config

    config = parse_config(IngestConfig, {**ingest_options, "resolution": resolution}, "ingest_options")
    result = ingest.run(
        images_uri, instance_images.path, config, class_noun=class_noun or None, subject_kind=subject_kind,
        consent=consent or None,
    )  # fmt: skip
    record = result.model_dump(mode="json")
    instance_images.metadata.update(
        {
            "source": images_uri,
            "num_images": len(record["images"]),
            "num_rejected": len(record["rejections"]),
            "rejections": record["rejections"],
            "warnings": record["warnings"],
            "digest": record["digest"],
            "source_digest": images_digest,
            "resolution": resolution,
            "subject": record["subject"],
        }
    )
    return (len(record["images"]), record["digest"])
