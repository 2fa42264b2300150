"""Fine-tune (DreamBooth, the paper's Eq. 2): a thin adapter over dreambooth_lib.train."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def fine_tune(
    base_model: str,
    base_model_digest: str,
    instance_images: Input[Dataset],
    instance_digest: str,
    prior_set: Input[Dataset],
    checkpoint_root: str,
    identifier: str,
    class_noun: str,
    resolution: int,
    steps: int,
    prior_loss_weight: float,
    mode: str,
    trained_model: Output[Model],
    selection: Output[Metrics],
    train_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    eval_options: dict = {},  # noqa: B006
    live: bool = False,
    allow_pickle: bool = False,
) -> NamedTuple("TrainOutputs", model_uri=str):
    """Train on the ingested photos with 'a [V] [class]' (+ λ × the prior set with 'a [class]') into trained_model.

    The artifact holds `model/` (a diffusers folder, or a LoRA folder with mode='lora') and `train_summary.json`
    only. Checkpoints go to `checkpoint_root` (a durable gs:// prefix on a cluster), keyed by the run's content,
    so a retried pod on an empty disk resumes from its newest complete one; they are deleted after success
    unless train_options {"keep_checkpoints_on_success": true}. Empty: a scratch folder of this pod (no resume
    after preemption). `base_model_digest` and `instance_digest` key KFP's cache on content. `train_options` holds
    any other TrainConfig field (learning_rate, lora_rank, mixed_precision, ...).

    train_options {"select": {...}} scores a probe every N steps and exports the step its rule picks; the probe
    scores with the evaluators of `eval_options` (dino_model, clip_model, lpips_weights; else EvalConfig's) and
    the prompts of the subject's kind (`live`). `selection` logs the chosen step and every probe's scores.
    """
    import logging
    import tempfile

    from dreambooth_lib import prior, train
    from dreambooth_lib.config import EvalConfig, TrainConfig, parse_config

    prior_ref = prior.open_artifact(prior_set.path)
    values = {
        **train_options,
        "steps": steps,
        "prior_loss_weight": prior_loss_weight,
        "mode": mode,
        "resolution": resolution,
        "prior_mode": prior_ref.mode,  # the prior task's: sampled images, or the frozen model's own targets
    }
    config = parse_config(TrainConfig, values, "train_options")
    if config.select is not None:  # the probe scores with the evaluators the evaluate task uses
        evaluators = {
            k: eval_options[k] for k in ("dino_model", "clip_model", "lpips_weights") if k in eval_options
        }
        e = parse_config(EvalConfig, evaluators, "eval_options")
        config.select = config.select.with_evaluators(e.dino_model, e.clip_model, e.lpips_weights)
    if not checkpoint_root:
        logging.getLogger(__name__).warning(
            "checkpoint_root is empty: checkpoints stay on this pod's disk and a retried task starts over; "
            "set the pipeline parameter checkpoint_root to a gs:// prefix"
        )
    result = train.run(
        base_model,
        instance_images.path,
        prior_ref.uri or None,
        identifier,
        class_noun,
        config,
        trained_model.path,
        # A retried task (a preempted GPU node) finds this run's checkpoints under the durable root by content
        # and continues from the newest complete one; with none, training starts fresh.
        resume=True,
        allow_pickle=allow_pickle,
        prior_images=prior_ref.images,
        checkpoint_root=checkpoint_root or tempfile.mkdtemp(prefix="checkpoints-"),
        prior_key=prior_ref.key or None,
        live=live,
    )
    for name, value in train.selection_metrics(result.selection).items():
        selection.log_metric(name, value)
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
            "prior_key": prior_ref.key,
        }
    )
    return (result.model_uri,)
