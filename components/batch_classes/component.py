"""The distinct classes of a batch plan: the items of the loop that makes one prior set per class."""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def list_classes(subjects: list) -> list:
    """One item per distinct class noun: {class_noun, base_model_digest, prior_root}, sorted by class noun."""
    by_class = {s["class_noun"]: s for s in subjects}
    return [
        {"class_noun": noun, "base_model_digest": s["base_model_digest"], "prior_root": s["prior_root"]}
        for noun, s in sorted(by_class.items())
    ]
