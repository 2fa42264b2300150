"""personalize_subject: its parameters reach the RunConfig, and a subject's failure becomes its status."""

import json
from pathlib import Path

from kfp.dsl import Markdown

from components.batch_subject.component import personalize_subject
from components.conftest import artifact


def _call(tmp_path, name, **kwargs):
    out = artifact(Markdown, tmp_path / f"{name}.md")
    subject = {"name": name, "class_noun": "dog", "images": str(tmp_path / name), "live": True, "identifier": "zwx",
               "base_model_digest": "md", "prior_root": "/p"}  # fmt: skip
    result = personalize_subject.python_func(
        subject=subject, base_model="base", base_model_digest="md", prior_root=str(tmp_path / "priors"),
        batch_root=str(tmp_path / "b"), job_id="j1", status=out, resolution=64, steps=3, prior_loss_weight=0.5,
        prior_size=4, mode="lora", prior_options={"steps": 2}, gate_thresholds={"min_dino": 0.1}, run_options={"ingest": {"min_side": 64}},
        **kwargs,
    )  # fmt: skip
    record = json.loads((tmp_path / "b" / "j1" / "status" / f"{name}.json").read_text())
    return result, record, out


def test_parameters_reach_the_run_and_failures_are_recorded(tmp_path, monkeypatch):
    from dreambooth_lib.runs import personalize

    seen = {}

    def fake_run(config, resume=False, reuse_training=False):
        seen[config.subject.name] = config
        raise FileNotFoundError(f"{config.subject.images}: no photos")

    monkeypatch.setattr(personalize, "run", fake_run)
    (ok, run_dir), record, out = _call(tmp_path, "rex", registry_uri="reg")
    config = seen["rex"]
    assert config.identifier.identifier == "zwx" and config.subject.live is True
    assert config.train.steps == 3 and config.train.resolution == 64 and config.ingest.resolution == 64
    assert config.ingest.min_side == 64 and config.prior.num_images == 4 and config.prior.steps == 2
    assert config.train.prior_loss_weight == 0.5 and config.train.mode == "lora"
    assert config.prior.root == str(tmp_path / "priors") and config.eval.gate.min_dino == 0.1
    assert config.registry.uri == "reg" and config.run_dir == run_dir == str(
        tmp_path / "b" / "j1" / "subjects" / "rex"
    )
    assert ok is False and record["status"] == "failed" and "no photos" in record["error"]
    assert record["identifier"] == "zwx" and record["base_model_digest"] == "md"
    assert Path(out.path).read_text().startswith("# rex: failed") and out.metadata["status"] == "failed"
