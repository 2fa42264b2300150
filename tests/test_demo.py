"""The demo's pipelines through kfp.local end to end on the tiny model: what a user gets from `make demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    from pipelines import demo

    out = tmp_path_factory.mktemp("demo")
    paths = demo.build_models(out)
    demo.init_local(out / "kfp-root")
    return demo, out, paths


def test_personalize_end_to_end(demo_env):
    from dreambooth_lib.registry import open_registry

    demo, out, paths = demo_env
    subject = demo.make_subject(out / "subjects" / "red-square")
    result = demo.run_personalize(out, paths, subject, out / "registry")
    model = Path(result["model"])
    assert (model / "model" / "model_index.json").exists() and (model / "train_summary.json").exists()
    identifier = json.loads((model / "train_summary.json").read_text())["identifier"]
    assert {"dino", "clip_i", "clip_t", "pres", "div"} <= set(result["metrics"])
    assert (
        result["report_html"].endswith("report.html")
        and "<html" in Path(result["report_html"]).read_text().lower()
    )
    assert (
        json.loads(Path(result["metrics_json"]).read_text())["metrics"]["dino"] == result["metrics"]["dino"]
    )
    (entry,) = open_registry(str(out / "registry")).list_models()
    assert entry.subject == "red-square" and entry.version == 1 and entry.identifier == identifier
    assert Path(entry.model_uri, "model_index.json").exists()
    # the prior set was generated once into the task's artifact, with the tiny settings
    priors = list((out / "kfp-root").rglob("prior_set.json"))
    assert priors and len(list(priors[0].parent.glob("*.png"))) == 4


def test_personalize_without_a_prior_trains_with_no_prior_loss(demo_env):
    """prior_size 0 with the default λ: the prior task makes an empty set and fine-tune trains with λ 0 (it used
    to fail for want of prior images)."""
    demo, out, paths = demo_env
    subject = demo.make_subject(out / "subjects" / "no-prior", seed=2)
    result = demo.run_personalize(out, paths, subject, registry=None, prior_size=0)
    summary = json.loads((Path(result["model"]) / "train_summary.json").read_text())
    assert summary["num_prior_images"] == 0 and summary["config"]["prior_loss_weight"] == 0.0
    assert {"dino", "clip_i", "clip_t"} <= set(result["metrics"])


def test_batch_isolates_failures_and_summarizes(demo_env):
    demo, out, paths = demo_env
    good = demo.make_subject(out / "subjects" / "blue-square", color=(30, 60, 220), seed=1)
    entries = [
        {"name": "blue-square", "class_noun": "square", "images": str(good)},
        {"name": "missing-photos", "class_noun": "square", "images": str(out / "nowhere")},
        {"name": "Bad Name", "class_noun": "square", "images": str(good)},
    ]
    summary = demo.run_batch(out, paths, entries, out / "batch-registry")
    subjects = summary["subjects"]
    assert set(subjects) == {"blue-square", "missing-photos", "Bad Name"}
    assert subjects["blue-square"]["status"] == "registered", subjects["blue-square"].get("error")
    assert (
        subjects["missing-photos"]["status"] == "failed" and "nowhere" in subjects["missing-photos"]["error"]
    )
    assert subjects["Bad Name"]["status"] == "failed" and subjects["Bad Name"]["step"] == "plan"
    assert summary["title"].endswith("1 of 3 subjects succeeded")
    table = Path(summary["summary_md"]).read_text()
    assert "| blue-square | square |" in table and "missing-photos" in table
    chosen = subjects["blue-square"]["chosen_step"]  # the batch trains with train.select on
    assert chosen in (4, 8) and f"| {chosen} | passed |" in table
    # one prior set for the class, reused by the subject (made by the class loop, found by the subject)
    prior_sets = list((out / "batches" / "priors").glob("*/prior_set.json"))
    assert len(prior_sets) == 1
