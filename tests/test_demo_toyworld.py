"""`make demo`'s personalize on the shipped toy world through kfp.local: the report shows DreamBooth binding the
subject (a star split yellow | blue that the base model never draws) while "a star" stays a plain star."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.mark.slow
def test_the_toy_world_demo_renders_its_subject_and_names_its_evaluators(tmp_path):
    from pipelines import demo

    paths = demo.toyworld_models(tmp_path)
    demo.init_local(tmp_path / "kfp-root")
    subject = demo.make_toy_subject(tmp_path / "subjects" / "split-star")
    result = demo.run_personalize(tmp_path, paths, subject, tmp_path / "registry")

    rate = demo.toy_subject_rates(result["metrics_json"])
    assert rate["identifier_prompts"] >= 0.5 and rate["class_prompt"] <= 0.25, rate
    record = json.loads(Path(result["metrics_json"]).read_text())
    assert [p["prompt"].split(" ", 2)[2] for p in record["per_prompt"]] == [
        f"star on a {b} background" for b in demo.TOY_BACKGROUNDS
    ]
    page = Path(result["report_html"]).read_text()
    assert "toy-world DINO stand-in" in page and "toy-world CLIP stand-in" in page
