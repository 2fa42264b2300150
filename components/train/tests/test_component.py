"""fine_tune: the adapter passes the typed params into TrainConfig and records lineage in the Model metadata."""

import json
from pathlib import Path

import pytest
from kfp.dsl import Metrics, Model

from components.conftest import TINY_TRAIN, artifact
from components.train.component import fine_tune


def test_writes_model_and_lineage(trained):
    root = Path(trained.path)
    assert (root / "model" / "model_index.json").exists()
    # the Model artifact holds the model and its summary only: checkpoints live under checkpoint_root
    assert sorted(p.name for p in root.iterdir()) == ["model", "train_summary.json"]
    summary = json.loads((root / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["identifier"] == "zwx"
    meta = trained.metadata
    assert meta["identifier"] == "zwx" and meta["prompt"] == "a zwx square" and meta["mode"] == "full"
    assert meta["base_model_digest"] == "md" and meta["instance_digest"] == "id" and meta["steps"] == 2
    assert meta["model_uri"] == str(root / "model")


def test_named_params_override_options(ingested, no_prior, tiny_model_dir, tmp_path):
    """The pipeline's typed parameters win over the same fields in train_options (a stale options dict must not
    change what the DAG says it trains)."""
    stale = {"steps": 50, "mode": "full", "resolution": 32, "prior_loss_weight": 1.0, "log_every": 1}
    out = artifact(Model, tmp_path / "m")
    fine_tune.python_func(
        base_model=tiny_model_dir, base_model_digest="", instance_images=ingested, instance_digest="",
        prior_set=no_prior, checkpoint_root="", identifier="zwx", class_noun="square", resolution=64, steps=1,
        prior_loss_weight=0.0, mode="lora", trained_model=out,
        selection=artifact(Metrics, tmp_path / "s"), train_options=stale,
    )  # fmt: skip
    summary = json.loads((Path(out.path) / "train_summary.json").read_text())
    assert (summary["steps"], summary["mode"], summary["num_prior_images"]) == (1, "lora", 0)
    assert (summary["config"]["resolution"], summary["config"]["prior_loss_weight"]) == (64, 0.0)
    assert summary["config"]["log_every"] == 1  # fields without a typed parameter still come from the options


def test_a_bad_mode_is_a_config_error(ingested, no_prior, tiny_model_dir, tmp_path):
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        fine_tune.python_func(
            base_model=tiny_model_dir, base_model_digest="", instance_images=ingested, instance_digest="",
            prior_set=no_prior, checkpoint_root="", identifier="zwx", class_noun="square", resolution=64, steps=1,
            prior_loss_weight=0.0, mode="qlora", trained_model=artifact(Model, tmp_path / "m"),
            selection=artifact(Metrics, tmp_path / "s"),
        )  # fmt: skip


def test_a_retried_task_resumes_from_the_checkpoint_root(ingested, no_prior, tiny_model_dir, tmp_path):
    """A retried pod gets a new, empty Model artifact; the durable checkpoint root is what it resumes from."""
    root = str(tmp_path / "durable")
    options = {
        "learning_rate": 1e-4,
        "log_every": 1,
        "checkpoint_every": 2,
        "keep_checkpoints_on_success": True,
    }

    def attempt(name: str, steps: int) -> Model:
        out = artifact(Model, tmp_path / name / "model")
        fine_tune.python_func(
            base_model=tiny_model_dir, base_model_digest="md", instance_images=ingested, instance_digest="id",
            prior_set=no_prior, checkpoint_root=root, identifier="zwx", class_noun="square", resolution=64,
            steps=steps, prior_loss_weight=0.0, mode="lora", trained_model=out,
            selection=artifact(Metrics, tmp_path / name / "s"), train_options=options,
        )  # fmt: skip
        return out

    first = attempt("first", 2)
    assert first.metadata["resumed_from"] is None
    again = attempt("retry", 4)  # steps may grow: the same run's content key
    assert again.metadata["resumed_from"] == 2
    assert again.metadata["checkpoint_dir"].startswith(root)


def test_select_scores_with_the_evaluate_options_and_logs_the_chosen_step(
    ingested, no_prior, tiny_model_dir, tiny_evaluators, tmp_path
):
    """train_options {"select": ...} without evaluators takes eval_options' (as the evaluate task scores), and the
    selection Metrics artifact carries the chosen step and every probe's scores."""
    out, selection = artifact(Model, tmp_path / "m"), artifact(Metrics, tmp_path / "s")
    rule = {"every": 1, "prompts": 1, "images_per_prompt": 1, "class_images": 1, "steps": 1}
    fine_tune.python_func(
        base_model=tiny_model_dir, base_model_digest="", instance_images=ingested, instance_digest="",
        prior_set=no_prior, checkpoint_root="", identifier="zwx", class_noun="square", resolution=64, steps=2,
        prior_loss_weight=0.0, mode="lora", trained_model=out, selection=selection,
        train_options={**TINY_TRAIN, "select": rule}, eval_options={**tiny_evaluators, "steps": 3}, live=True,
    )  # fmt: skip
    summary = json.loads((Path(out.path) / "train_summary.json").read_text())
    chosen = summary["selection"]["chosen_step"]
    assert summary["config"]["select"]["dino_model"] == tiny_evaluators["dino_model"]
    assert summary["selection"]["prompts"] == ["a zwx square in the jungle"]  # the paper's first live prompt
    logged = selection.metadata
    assert logged["chosen_step"] == chosen and chosen in (1, 2)
    assert {f"probe_{s}_dino" for s in (0, 1, 2)} <= logged.keys()
    assert logged["chosen_dino"] == logged[f"probe_{chosen}_dino"]
