"""evaluate_model: metrics logged to the Metrics artifact, report.html as the HTML artifact, gate verdict out."""

import json
from pathlib import Path


def test_metrics_report_and_gate(evaluated):
    outs, (passed, reasons) = evaluated
    logged = outs["metrics"].metadata
    assert {"dino", "clip_i", "clip_t", "pres", "div", "gate_passed"} <= set(logged)
    doc = json.loads((Path(outs["evaluation"].path) / "metrics.json").read_text())
    assert logged["clip_t"] == doc["metrics"]["clip_t"]
    assert passed is True and reasons == "" and logged["gate_passed"] == 1.0
    assert doc["config"]["prompts"] == ["a {0} {1}", "a {0} {1} on grass"]
    assert Path(outs["report"].path).read_text().lstrip().lower().startswith("<!doctype html")
    assert outs["evaluation"].metadata["identifier"] == "zwx"


def test_a_failed_gate_is_reported_not_raised(
    trained, ingested, no_prior, tiny_model_dir, tiny_evaluators, tmp_path
):
    from kfp.dsl import HTML, Artifact, Metrics

    from components.conftest import TINY_EVAL, artifact
    from components.evaluate.component import evaluate_model

    passed, reasons = evaluate_model.python_func(
        trained_model=trained, instance_images=ingested, base_model=tiny_model_dir, identifier="zwx",
        class_noun="square", live=False, resolution=64, prior_set=no_prior, gate_thresholds={"min_dino": 0.999},
        eval_options={**TINY_EVAL, "max_prompts": 1, "images_per_prompt": 1, "pres_images": 0, **tiny_evaluators},
        metrics=artifact(Metrics, tmp_path / "m"), report=artifact(HTML, tmp_path / "r"),
        evaluation=artifact(Artifact, tmp_path / "e"),
    )  # fmt: skip
    assert passed is False and "DINO" in reasons


def test_pres_is_sampled_from_the_trained_model_and_the_prior_set_only_shown(
    trained, ingested, tiny_model_dir, tiny_evaluators, tmp_path
):
    """PRES scores "a [class noun]" images the fine-tuned model samples (the prior set came from the base model);
    the report shows the prior set, counting all of it."""
    from kfp.dsl import HTML, Artifact, Dataset, Metrics

    from components.conftest import TINY_EVAL, artifact
    from components.evaluate.component import evaluate_model
    from components.prior.component import make_prior_set

    prior_set = artifact(Dataset, tmp_path / "prior_set")
    make_prior_set.python_func(
        base_model=tiny_model_dir, base_model_digest="md", class_noun="square", resolution=64, prior_size=9,
        prior_root="", prior_set=prior_set, prior_options={"steps": 1, "batch_size": 9},
    )  # fmt: skip
    evaluation = artifact(Artifact, tmp_path / "e")
    evaluate_model.python_func(
        trained_model=trained, instance_images=ingested, base_model=tiny_model_dir, identifier="zwx",
        class_noun="square", live=False, resolution=64, prior_set=prior_set,
        eval_options={**TINY_EVAL, "max_prompts": 1, "images_per_prompt": 1, "pres_images": 1, **tiny_evaluators},
        metrics=artifact(Metrics, tmp_path / "m"), report=artifact(HTML, tmp_path / "r"), evaluation=evaluation,
    )  # fmt: skip
    doc = json.loads((Path(evaluation.path) / "metrics.json").read_text())
    assert doc["pres_images"] == ["images/_pres/00.png"] and doc["metrics"]["pres"] is not None
    page = (Path(evaluation.path) / "report.html").read_text()
    assert "Class prior sample (8 of 9)" in page
