"""`batch_personalize`: many subjects from a manifest, priors made once per class, failures isolated.

plan (manifest → subjects with distinct identifiers) → distinct classes → ParallelFor over classes (one prior
set per (base model, class) in the shared, content-addressed prior root) → packed LoRA training (LoRA subjects
trained K per UNet batch, `pack_size` 0 = as many as the GPU holds) → ParallelFor over subjects (one task each,
which finds its class's prior set in that cache, reuses the model its pack trained or trains alone, and catches
its own failure) — all inside an exit handler whose task writes the batch summary (Markdown + HTML) whatever
happened.

A batch trains LoRA adapters by default (`mode` "lora", with TrainConfig's learning rate for LoRA), so packing is
on; `mode: full` fine-tunes each subject in its own task instead (the pack step does nothing). `prior_size` 0 or
`prior_loss_weight` 0 turns prior preservation off: the class loop writes empty sets without loading the model
and the subjects train with λ = 0. The other defaults are the config models' (dreambooth_lib.runs.defaults).
"""

from kfp import dsl

from components.batch_classes.component import list_classes
from components.batch_plan.component import plan_batch
from components.batch_subject.component import personalize_subject
from components.batch_summary.component import check_batch, summarize_batch
from components.batch_train_packed.component import train_packed_loras
from components.prior.component import make_prior_set
from dreambooth_lib.runs import defaults
from pipelines.placement import Placement, load_placement, on_cpu, on_gpu

PIPELINE_NAME = "dreambooth-batch-personalize"


def build_batch_personalize(placement: Placement):
    """The batch pipeline with `placement` applied (its `parallelism` bounds both loops)."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DreamBooth for many subjects: shared class priors, per-subject isolation, a batch summary.",
    )
    def batch_personalize(
        manifest_uri: str,
        base_model: str,
        batch_root: str,
        resolution: int = defaults.RESOLUTION,
        steps: int = defaults.STEPS,
        prior_loss_weight: float = defaults.PRIOR_LOSS_WEIGHT,
        prior_size: int = defaults.PRIOR_SIZE,
        prior_root: str = "",
        mode: str = defaults.BATCH_MODE,
        eval_prompts: list = [],  # noqa: B006 - KFP reads the literal default into the spec
        gate_thresholds: dict = {},  # noqa: B006
        registry_uri: str = "",
        identifier_options: dict = {},  # noqa: B006
        prior_options: dict = {},  # noqa: B006
        run_options: dict = {},  # noqa: B006
        allow_pickle: bool = False,
        pack_size: int = 0,
    ):
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        summary = summarize_batch(manifest_uri=manifest_uri, batch_root=batch_root, job_id=job_id)
        summary.set_display_name("batch summary").set_caching_options(False)
        on_cpu(summary, placement, retry=False)

        with dsl.ExitHandler(summary, name="batch"):
            plan = plan_batch(
                manifest_uri=manifest_uri,
                base_model=base_model,
                batch_root=batch_root,
                job_id=job_id,
                registry_uri=registry_uri,
                prior_root=prior_root,
                identifier_options=identifier_options,
                allow_pickle=allow_pickle,
            )
            plan.set_display_name("plan batch").set_caching_options(False)  # reads the manifest and registry
            on_cpu(plan, placement, loads_model=True)

            classes = list_classes(subjects=plan.outputs["Output"])
            classes.set_display_name("distinct classes").set_caching_options(False)
            on_cpu(classes, placement, retry=False)

            with dsl.ParallelFor(classes.output, parallelism=placement.parallelism, name="classes") as item:
                prior = make_prior_set(
                    base_model=base_model,
                    base_model_digest=item.base_model_digest,
                    class_noun=item.class_noun,
                    resolution=resolution,
                    prior_size=prior_size,
                    prior_loss_weight=prior_loss_weight,
                    prior_root=item.prior_root,
                    prior_options=prior_options,
                    allow_pickle=allow_pickle,
                )
                on_gpu(prior.set_display_name("class-prior images"), placement)

            # what both the pack step and the subject step lay onto the run options: the same arguments, so they
            # build the same RunConfig and a subject finds the model its pack trained as its own
            run_settings = {
                "base_model": base_model,
                "batch_root": batch_root,
                "job_id": job_id,
                "resolution": resolution,
                "steps": steps,
                "prior_loss_weight": prior_loss_weight,
                "prior_size": prior_size,
                "mode": mode,
                "prior_options": prior_options,
                "run_options": run_options,
                "allow_pickle": allow_pickle,
            }
            pack = train_packed_loras(
                subjects=plan.outputs["Output"], pack_size=pack_size, **run_settings
            ).after(prior)
            pack.set_display_name("train packed LoRA").set_caching_options(False)  # writes the run dirs
            # Retried like the other GPU steps: a rerun retrains the pack; its subjects' own failures never
            # fail it (they are left to train alone).
            on_gpu(pack, placement)

            with dsl.ParallelFor(
                plan.outputs["Output"], parallelism=placement.parallelism, name="subjects"
            ) as subject:
                one = personalize_subject(
                    subject=subject,
                    base_model_digest=subject.base_model_digest,
                    prior_root=subject.prior_root,
                    eval_prompts=eval_prompts,
                    gate_thresholds=gate_thresholds,
                    registry_uri=registry_uri,
                    **run_settings,
                ).after(pack)
                one.set_display_name("personalize subject").set_caching_options(False)  # writes the registry
                # No retry: the task never fails on a subject's error; it records it.
                on_gpu(one, placement, retry=False)

            # The verdict fails the run when no subject succeeded. It is a task inside the handler because on KFP
            # the exit task is an Argo exit hook, whose failure leaves the run's state unchanged.
            verdict = check_batch(manifest_uri=manifest_uri, batch_root=batch_root, job_id=job_id).after(one)
            verdict.set_display_name("batch verdict").set_caching_options(False)  # reads this run's records
            on_cpu(verdict, placement)

    return batch_personalize


batch_personalize = build_batch_personalize(load_placement("gke"))
