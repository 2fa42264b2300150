"""`personalize`: one subject, ingest → identifier → class prior → fine-tune → evaluate → register.

Built by a factory because placement (accelerators, node pools, the target: KFP or Vertex) is fixed at compile
time; `personalize` is the pipeline for the default placement (GKE). Caching keys on content: an uncached
fingerprint task digests the base model and the photos, and those digests are inputs of every cached step.

Nothing crosses tasks but declared artifacts (on Kubeflow each task is its own pod with its own disk): the prior
set is an input artifact of fine-tune and evaluate. The two durable locations a run may name explicitly are
`prior_root` (a class-prior cache shared across runs) and `checkpoint_root` (where fine-tune checkpoints, keyed by
content, so a retried pod resumes); on a cluster both should be gs:// prefixes.

`prior_size` 0 or `prior_loss_weight` 0 turns prior preservation off: the prior task writes an empty set without
loading the model and hands fine-tune λ = 0 (its `train_prior_loss_weight` output). The parameters' defaults are
the config models' (dreambooth_lib.runs.defaults): the same as `dreambooth run`.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Metrics, Model

from components.evaluate.component import evaluate_model
from components.fingerprint.component import fingerprint_inputs
from components.identifier.component import choose_identifier
from components.ingest.component import ingest_images
from components.prior.component import make_prior_set
from components.register.component import register_model
from components.train.component import fine_tune
from dreambooth_lib.runs import defaults
from pipelines.placement import Placement, load_placement, on_cpu, on_gpu

PIPELINE_NAME = "dreambooth-personalize"


class PersonalizeOutputs(NamedTuple):
    model: Model
    metrics: Metrics
    report: HTML


def build_personalize(placement: Placement):
    """The personalize pipeline with `placement` applied to its tasks."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DreamBooth: personalize a text-to-image model on one subject's photos, evaluate, register.",
    )
    def personalize(
        base_model: str,
        images_uri: str,
        subject_name: str,
        class_noun: str,
        live: bool = False,
        subject_kind: str = "object",
        consent: dict = {},  # noqa: B006
        resolution: int = defaults.RESOLUTION,
        steps: int = defaults.STEPS,
        prior_loss_weight: float = defaults.PRIOR_LOSS_WEIGHT,
        prior_size: int = defaults.PRIOR_SIZE,
        prior_root: str = "",
        checkpoint_root: str = "",
        mode: str = defaults.MODE,
        eval_prompts: list = [],  # noqa: B006 - KFP reads the literal default into the spec
        gate_thresholds: dict = {},  # noqa: B006
        registry_uri: str = "",
        ingest_options: dict = {},  # noqa: B006
        identifier_options: dict = {},  # noqa: B006
        prior_options: dict = {},  # noqa: B006
        train_options: dict = {},  # noqa: B006
        eval_options: dict = {},  # noqa: B006
        allow_pickle: bool = False,
    ) -> PersonalizeOutputs:
        fingerprint = fingerprint_inputs(
            base_model=base_model, images_uri=images_uri, allow_pickle=allow_pickle
        )
        fingerprint.set_display_name("fingerprint inputs").set_caching_options(False)
        on_cpu(fingerprint, placement, loads_model=True)

        ingest = ingest_images(
            images_uri=images_uri,
            images_digest=fingerprint.outputs["images_digest"],
            resolution=resolution,
            ingest_options=ingest_options,
            class_noun=class_noun,
            subject_kind=subject_kind,  # a person without a consent record is refused here, before any GPU
            consent=consent,
        )
        on_cpu(ingest.set_display_name("ingest and validate photos"), placement)

        chosen = choose_identifier(
            base_model=base_model,
            class_noun=class_noun,
            registry_uri=registry_uri,
            identifier_options=identifier_options,
            allow_pickle=allow_pickle,
        ).after(fingerprint)
        chosen.set_display_name("choose identifier").set_caching_options(False)  # reads the registry
        on_cpu(chosen, placement, loads_model=True)

        prior = make_prior_set(
            base_model=base_model,
            base_model_digest=fingerprint.outputs["base_model_digest"],
            class_noun=class_noun,
            resolution=resolution,
            prior_size=prior_size,
            prior_loss_weight=prior_loss_weight,
            prior_root=prior_root,
            prior_options=prior_options,
            allow_pickle=allow_pickle,
        )
        on_gpu(prior.set_display_name("class-prior images"), placement)

        train = fine_tune(
            base_model=base_model,
            base_model_digest=fingerprint.outputs["base_model_digest"],
            instance_images=ingest.outputs["instance_images"],
            instance_digest=ingest.outputs["digest"],
            prior_set=prior.outputs["prior_set"],
            checkpoint_root=checkpoint_root,
            identifier=chosen.outputs["identifier"],
            class_noun=class_noun,
            resolution=resolution,
            steps=steps,
            prior_loss_weight=prior.outputs["train_prior_loss_weight"],  # 0 when the prior set is empty
            mode=mode,
            train_options=train_options,
            eval_options=eval_options,  # train_options.select's probe scores with the evaluate task's evaluators
            live=live,
            allow_pickle=allow_pickle,
        )
        on_gpu(train.set_display_name("fine-tune"), placement)

        evaluation = evaluate_model(
            trained_model=train.outputs["trained_model"],
            instance_images=ingest.outputs["instance_images"],
            base_model=base_model,
            identifier=chosen.outputs["identifier"],
            class_noun=class_noun,
            live=live,
            resolution=resolution,
            prior_set=prior.outputs["prior_set"],
            eval_prompts=eval_prompts,
            gate_thresholds=gate_thresholds,
            eval_options=eval_options,
            subject_name=subject_name,
            allow_pickle=allow_pickle,
        )
        on_gpu(evaluation.set_display_name("evaluate"), placement)

        with dsl.If(registry_uri != "", name="registry-given"):
            register = register_model(
                registry_uri=registry_uri,
                subject_name=subject_name,
                class_noun=class_noun,
                trained_model=train.outputs["trained_model"],
                evaluation=evaluation.outputs["evaluation"],
                instance_images=ingest.outputs["instance_images"],
            )
            register.set_display_name("register model").set_caching_options(False)  # writes the registry
            on_cpu(register, placement)

        return PersonalizeOutputs(
            model=train.outputs["trained_model"],
            metrics=evaluation.outputs["metrics"],
            report=evaluation.outputs["report"],
        )

    return personalize


personalize = build_personalize(load_placement("gke"))
