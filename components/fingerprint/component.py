"""Content digests of the base model and the subject photos, so downstream caching keys on content, not URIs."""

from typing import NamedTuple

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fingerprint_inputs(
    base_model: str,
    images_uri: str,
    allow_pickle: bool = False,
) -> NamedTuple("Fingerprints", base_model_digest=str, images_digest=str):
    """sha256 digests of the model folder and the photo folder (the pipeline runs this task uncached).

    A URI can change underneath (new photos at the same gs:// prefix, a re-uploaded model): the digests become
    inputs of the cached steps, so a change of content is a cache miss and an unchanged content is a hit.
    """
    from dreambooth_lib import models, storage

    return (models.model_digest(base_model, allow_pickle=allow_pickle), storage.digest_prefix(images_uri))
