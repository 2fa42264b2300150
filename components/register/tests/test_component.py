"""register_model: registers into the registry only a model that passed its real quality gate; the model card
becomes the Markdown artifact."""

import json
from pathlib import Path

import pytest
from kfp.dsl import Markdown

from components.conftest import artifact
from components.register.component import register_model

# The gates below are set on CLIP-T, around what the tiny model really scores: its value has room on both sides
# (a random-weight DINO scores near 1, where no threshold could be set above it).
MARGIN = 0.05


@pytest.fixture(scope="module")
def clip_t(evaluated) -> float:
    """The trained tiny model's CLIP-T, as the evaluate component measured it (no gate)."""
    outs, _ = evaluated
    value = json.loads((Path(outs["evaluation"].path) / "metrics.json").read_text())["metrics"]["clip_t"]
    assert -1 + MARGIN < value < 1 - MARGIN  # room for a threshold below and above it
    return value


def _register(evaluation, trained, ingested, tmp_path, **kwargs):
    card = artifact(Markdown, tmp_path / "card")
    model_uri, version = register_model.python_func(
        registry_uri=str(tmp_path / "registry"), subject_name="red", class_noun="square", trained_model=trained,
        evaluation=evaluation, instance_images=ingested, model_card=card, **kwargs,
    )  # fmt: skip
    return model_uri, version, card


def test_registers_a_model_that_meets_its_gate(trained, evaluate_with, clip_t, ingested, tmp_path):
    from dreambooth_lib.registry import open_registry

    outs, (passed, _) = evaluate_with({"min_clip_t": clip_t - MARGIN})
    assert passed is True

    model_uri, version, card = _register(outs["evaluation"], trained, ingested, tmp_path)
    (entry,) = open_registry(str(tmp_path / "registry")).list_models()
    assert (entry.subject, str(entry.version), entry.model_uri) == ("red", version, model_uri)
    assert entry.gate_passed is True and entry.identifier == "zwx"
    assert card.metadata["identifier"] == "zwx" and card.metadata["gate_passed"] is True
    text = Path(card.path).read_text()
    assert "`zwx`" in text and "Quality gate: passed." in text


def test_refuses_a_model_that_fails_its_gate(trained, evaluate_with, clip_t, ingested, tmp_path):
    from dreambooth_lib.errors import GateFailed
    from dreambooth_lib.registry import open_registry

    outs, (passed, reasons) = evaluate_with({"min_clip_t": clip_t + MARGIN})
    assert passed is False and "CLIP-T" in reasons

    with pytest.raises(GateFailed, match="quality gate failed: CLIP-T"):
        _register(outs["evaluation"], trained, ingested, tmp_path)
    assert not (tmp_path / "registry").exists()  # nothing registered, not even an index

    # require_gate=False registers it anyway, recorded as failed
    _, _, card = _register(outs["evaluation"], trained, ingested, tmp_path, require_gate=False)
    (entry,) = open_registry(str(tmp_path / "registry")).list_models()
    assert entry.gate_passed is False and card.metadata["gate_passed"] is False
    assert "Quality gate: failed (registered with require_gate=False)." in Path(card.path).read_text()
