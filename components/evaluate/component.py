"""Evaluate with the paper's protocol (DINO, CLIP-I, CLIP-T, PRES, DIV) and the quality gate: an adapter over
dreambooth_lib.evaluate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate_model(
    trained_model: Input[Model],
    instance_images: Input[Dataset],
    base_model: str,
    identifier: str,
    class_noun: str,
    live: bool,
    resolution: int,
    prior_set: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    eval_prompts: list = [],  # noqa: B006 - KFP reads the literal default into the spec
    gate_thresholds: dict = {},  # noqa: B006
    eval_options: dict = {},  # noqa: B006
    subject_name: str = "",
    allow_pickle: bool = False,
) -> NamedTuple("EvalOutputs", gate_passed=bool, gate_reasons=str):
    """Sample the trained model, score it against the real photos, write metrics, report.html and the gate verdict.

    `eval_prompts` (templates with {0}=identifier, {1}=class noun; empty: the paper's 25 for the subject kind)
    and `gate_thresholds` (GateConfig fields, e.g. {"min_dino": 0.5}) override `eval_options` (EvalConfig).
    """
    from dreambooth_lib import evaluate, prior, storage
    from dreambooth_lib.config import EvalConfig, parse_config

    values = dict(eval_options)
    values.setdefault("resolution", resolution)
    if eval_prompts:
        values["prompts"] = list(eval_prompts)
    values["gate"] = {**values.get("gate", {}), **gate_thresholds}
    config = parse_config(EvalConfig, values, "eval_options")
    # The prior set is only shown in the report. PRES cannot reuse it: the prior set was sampled from the base
    # model, and PRES scores "a [class noun]" images sampled from the fine-tuned one (eval_options.pres_images).
    prior_images = prior.open_artifact(prior_set.path).images
    result = evaluate.run(
        storage.join(trained_model.path, "model"),
        instance_images.path,
        identifier,
        class_noun,
        live,
        config,
        evaluation.path,
        base_model=base_model,
        allow_pickle=allow_pickle,
        prior_images=prior_images or None,
        subject_name=subject_name or None,
    )
    record = result.model_dump(mode="json")
    for name, value in record["metrics"].items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name, float(value))
    for name, value in (record.get("reference") or {}).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(f"real_{name}", float(value))
    gate = record["gate"]
    metrics.log_metric("gate_passed", 1.0 if gate["passed"] else 0.0)
    storage.copy(storage.join(evaluation.path, "report.html"), report.path)
    summary = {"identifier": identifier, "class_noun": class_noun, "gate_passed": gate["passed"]}
    evaluation.metadata.update({**summary, "metrics": record["metrics"], "gate_reasons": gate["reasons"]})
    report.metadata.update(summary)
    return (bool(gate["passed"]), "; ".join(gate["reasons"]))
