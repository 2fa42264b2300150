"""Fine-tune (DreamBooth, the paper's Eq. 2): a thin adapter over dreambooth_lib.train."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def fine_tune(
    base_model: str,
    base_model_digest: str,
    instance_images: Input[Dataset],
    instance_digest: str,
    prior_uri: str,
    prior_key: str,
    identifier: str,
    class_noun: str,
    resolution: int,
    steps: int,
    prior_loss_weight: float,
    mode: str,
    trained_model: Output[Model],
    train_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    allow_pickle: bool = False,
) -> NamedTuple("TrainOutputs", model_uri=str):
    """Train on the ingested photos with 'a [V] [class]' (+ λ × the prior set with 'a [class]') into trained_model.

    The artifact holds `model/` (a diffusers folder, or a LoRA folder with mode='lora'), `train_summary.json`
    and `checkpoints/`. `base_model_digest`, `instance_digest` and `prior_key` key the cache on content.
    `train_options` holds any other TrainConfig field (learning_rate, lora_rank, mixed_precision, ...).
    """
    from dreambooth_lib import train
    from dreambooth_lib.config import TrainConfig, parse_config

    values = {
        **train_options,
        "steps": steps,
        "prior_loss_weight": prior_loss_weight,
        "mode": mode,
        "resolution": resolution,
    }
    config = parse_config(TrainConfig, values, "train_options")
    result = train.run(
        base_model,
        instance_images.path,
        prior_uri or None,
        identifier,
        class_noun,
        config,
        trained_model.path,
        # A retried task (preempted GPU node) writes to the same artifact: continue from its newest complete
        # checkpoint; with none, training starts fresh.
        resume=True,
        allow_pickle=allow_pickle,
    )
    summary = result.model_dump(mode="json")
    trained_model.metadata.update(
        {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool)) or v is None}
    )
    trained_model.metadata.update(
        {
            "identifier": identifier,
            "class_noun": class_noun,
            "prompt": f"a {identifier} {class_noun}",
            "mode": mode,
            "steps": steps,
            "prior_loss_weight": prior_loss_weight,
            "base_model": base_model,
            "base_model_digest": base_model_digest,
            "instance_digest": instance_digest,
            "prior_key": prior_key,
        }
    )
    return (result.model_uri,)
