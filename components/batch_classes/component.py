"""The distinct classes of a batch plan: a thin adapter over dreambooth_lib.runs.batch.plan.distinct_classes."""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def list_classes(subjects: list) -> list:
    """One item per distinct class noun: {class_noun, base_model_digest, prior_root}, sorted by class noun.

    The items of the loop that makes one prior set per (base model, class) before any subject trains.
    """
    from dreambooth_lib.runs.batch.plan import distinct_classes

    return [item.model_dump(mode="json") for item in distinct_classes(subjects)]
