"""register_model: registers into the registry, the model card becomes the Markdown artifact."""

from pathlib import Path

import pytest
from kfp.dsl import Markdown

from components.conftest import artifact
from components.register.component import register_model


def test_registers_a_version_with_its_card(trained, evaluated, ingested, tmp_path):
    from dreambooth_lib.registry import open_registry

    outs, _ = evaluated
    card = artifact(Markdown, tmp_path / "card")
    model_uri, version = register_model.python_func(
        registry_uri=str(tmp_path / "registry"), subject_name="red", class_noun="square", trained_model=trained,
        evaluation=outs["evaluation"], instance_images=ingested, model_card=card,
    )  # fmt: skip
    (entry,) = open_registry(str(tmp_path / "registry")).list_models()
    assert (entry.subject, str(entry.version), entry.model_uri) == ("red", version, model_uri)
    assert entry.identifier == "zwx" and card.metadata["identifier"] == "zwx"
    assert "zwx" in Path(card.path).read_text()


def test_gate_failure_refuses(trained, evaluated, ingested, tmp_path):
    import json

    from dreambooth_lib.errors import GateFailed

    outs, _ = evaluated
    failed = tmp_path / "eval"
    failed.mkdir()
    doc = json.loads((Path(outs["evaluation"].path) / "metrics.json").read_text())
    doc["gate"] = {**doc["gate"], "passed": False, "reasons": ["DINO 0.1 < 0.5"]}
    (failed / "metrics.json").write_text(json.dumps(doc))
    from kfp.dsl import Artifact

    with pytest.raises(GateFailed):
        register_model.python_func(
            registry_uri=str(tmp_path / "registry"), subject_name="red", class_noun="square", trained_model=trained,
            evaluation=artifact(Artifact, failed), instance_images=ingested, model_card=artifact(Markdown, tmp_path / "c"),
        )  # fmt: skip
