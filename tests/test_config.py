"""Config validation: a bad field names the field, the bad value and what is allowed."""

import json

import pytest

from dreambooth_lib.config import (
    EvalConfig,
    RunConfig,
    Subject,
    TrainConfig,
    load_run_config,
    parse_config,
)
from dreambooth_lib.errors import ConfigError

GOOD = {
    "base_model": "runwayml/stable-diffusion-v1-5",
    "run_dir": "gs://bucket/runs/dog",
    "subject": {"name": "dog", "class_noun": "dog", "images": "gs://bucket/photos/dog", "live": True},
}


def test_defaults_follow_the_paper():
    cfg = parse_config(RunConfig, GOOD)
    assert cfg.train.learning_rate == 5e-6
    assert cfg.train.steps == 1000
    assert cfg.train.prior_loss_weight == 1.0
    assert cfg.train.mode == "full"
    assert cfg.prior.steps == 25 and cfg.prior.sampler == "dpm++"
    assert cfg.eval.images_per_prompt == 4
    assert cfg.identifier.max_chars == 3


def test_the_default_learning_rate_follows_the_mode():
    # the paper's rate for a full fine-tune; LoRA's few zero-initialised parameters need ~20x (diffusers' LoRA script)
    assert parse_config(TrainConfig, {}).learning_rate == 5e-6
    assert parse_config(TrainConfig, {"mode": "lora"}).learning_rate == 1e-4
    assert parse_config(TrainConfig, {"mode": "lora", "learning_rate": 3e-4}).learning_rate == 3e-4
    lora = parse_config(RunConfig, {**GOOD, "train": {"mode": "lora", "learning_rate": None}})
    assert lora.train.learning_rate == 1e-4  # an explicit null means "the mode's default", as absent does


def test_bad_value_names_field_value_and_rule():
    data = {**GOOD, "train": {"learning_rate": -1}}
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, data, "run.yaml")
    msg = str(err.value)
    assert "run.yaml" in msg and "train.learning_rate" in msg and "-1" in msg and "greater than 0" in msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config(TrainConfig, {"mode": "dora"})
    msg = str(err.value)
    assert "mode" in msg and '"dora"' in msg and "'full'" in msg and "'lora'" in msg


def test_unknown_field_is_an_error_not_ignored():
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, {**GOOD, "train": {"stpes": 10}})
    assert "train.stpes" in str(err.value) and "unknown field" in str(err.value)


def test_missing_field_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, {"base_model": "x", "run_dir": "y"})
    assert "subject: missing" in str(err.value)


def test_subject_name_must_be_a_slug():
    with pytest.raises(ConfigError) as err:
        parse_config(Subject, {"name": "My Dog!", "class_noun": "dog", "images": "x"})
    assert "name" in str(err.value) and "My Dog!" in str(err.value)


def test_resolutions_must_agree():
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, {**GOOD, "ingest": {"resolution": 256}})
    assert "ingest.resolution (256)" in str(err.value)


def test_gate_thresholds_are_bounded():
    with pytest.raises(ConfigError) as err:
        parse_config(EvalConfig, {"gate": {"min_dino": 3}})
    assert "gate.min_dino" in str(err.value)


def test_load_yaml_and_json_with_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "base_model: m\nrun_dir: r\nsubject: {name: dog, class_noun: dog, images: p}\ntrain: {steps: 5}\n"
    )
    cfg = load_run_config(tmp_path / "run.yaml", {"train.steps": 7, "prior.num_images": 3})
    assert cfg.train.steps == 7 and cfg.prior.num_images == 3
    (tmp_path / "run.json").write_text(json.dumps(GOOD))
    assert load_run_config(tmp_path / "run.json").subject.live is True


def test_an_override_fills_a_section_the_file_leaves_null(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "base_model: m\nrun_dir: r\nsubject: {name: dog, class_noun: dog, images: p}\nregistry: null\n"
    )
    cfg = load_run_config(tmp_path / "run.yaml", {"registry.uri": "gs://b/registry"})
    assert cfg.registry.uri == "gs://b/registry"
    with pytest.raises(ConfigError, match=r"cannot set subject\.name\.x: subject\.name is str"):
        load_run_config(tmp_path / "run.yaml", {"subject.name.x": 1})


def test_load_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
