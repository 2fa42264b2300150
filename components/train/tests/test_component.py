"""fine_tune: the adapter passes the typed params into TrainConfig and records lineage in the Model metadata."""

import json
from pathlib import Path

import pytest
from kfp.dsl import Model

from components.conftest import artifact
from components.train.component import fine_tune


def test_writes_model_and_lineage(trained):
    root = Path(trained.path)
    assert (root / "model" / "model_index.json").exists()
    summary = json.loads((root / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["identifier"] == "zwx"
    meta = trained.metadata
    assert meta["identifier"] == "zwx" and meta["prompt"] == "a zwx square" and meta["mode"] == "full"
    assert meta["base_model_digest"] == "md" and meta["instance_digest"] == "id" and meta["steps"] == 2
    assert meta["model_uri"] == str(root / "model")


def test_named_params_override_options(ingested, tiny_model_dir, tmp_path):
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        fine_tune.python_func(
            base_model=tiny_model_dir, base_model_digest="", instance_images=ingested, instance_digest="",
            prior_uri="", prior_key="", identifier="zwx", class_noun="square", resolution=64, steps=1,
            prior_loss_weight=0.0, mode="qlora", trained_model=artifact(Model, tmp_path / "m"),
        )  # fmt: skip
