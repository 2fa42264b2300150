"""The class-prior image set: a thin adapter over dreambooth_lib.prior (content-addressed, shared per class)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def make_prior_set(
    base_model: str,
    base_model_digest: str,
    class_noun: str,
    resolution: int,
    prior_size: int,
    prior_root: str,
    prior_set: Output[Dataset],
    prior_loss_weight: float = 1.0,  # TrainConfig's λ; the pipelines pass theirs
    prior_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    allow_pickle: bool = False,
) -> NamedTuple("PriorOutputs", prior_key=str, num_images=int, train_prior_loss_weight=float):
    """Sample `prior_size` 'a [class]' images, or reuse the set under `prior_root` made with the same settings.

    Consumers take `prior_set` as an input artifact. With `prior_root` empty the images are written into it; a
    shared root (a durable gs://.../priors the pipeline names) lets every subject of the class, in this run and
    later ones, reuse one set, and the artifact then records that set's URI. `base_model_digest` only keys the
    cache on the model's content.

    `prior_size` 0 or `prior_loss_weight` 0 turns prior preservation off: an empty set, written without loading
    the model. The `train_prior_loss_weight` output is the λ fine-tune trains with: the input's, or 0 when the
    prior is off (`prior_size` 0 with λ > 0 is read as off, with a warning in the log and the artifact's
    metadata).
    """
    import logging

    from dreambooth_lib import prior
    from dreambooth_lib.config import PriorConfig, parse_config

    mode = parse_config(PriorConfig, prior_options, "prior_options").mode
    kept = prior.preservation(
        prior_size,
        prior_loss_weight,
        num_images_name="prior_size",
        weight_name="prior_loss_weight",
        mode=mode,
    )
    if kept.warning:
        logging.getLogger(__name__).warning(kept.warning)
    num_images = prior_size if kept.samples else 0
    config = parse_config(PriorConfig, {**prior_options, "num_images": num_images}, "prior_options")
    root = prior_root or config.root or prior_set.path
    result = prior.run(
        base_model,
        class_noun,
        config,
        root=root,
        resolution=config.resolution or resolution,
        allow_pickle=allow_pickle,
    )
    prior.write_artifact(prior_set.path, result)
    prior_set.metadata.update(
        {
            "shared_set": "" if root == prior_set.path else result.uri,
            "key": result.key,
            "class_noun": class_noun,
            "num_images": len(result.images),
            "generated": result.generated,
            "reused": result.reused,
            "model_digest": result.model_digest,
            "prior_preservation": kept.on,
            **({"warning": kept.warning} if kept.warning else {}),
        }
    )
    return (result.key, len(result.images), kept.prior_loss_weight)
