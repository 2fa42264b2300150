"""plan_batch: distinct identifiers across subjects, distinct classes, bad entries recorded and left out."""

import json
from pathlib import Path

import pytest
from kfp.dsl import Artifact

from components.batch_plan.component import plan_batch
from components.conftest import artifact


def _plan(tmp_path, tiny_model_dir, manifest_text, name="m.yaml"):
    manifest = tmp_path / name
    manifest.write_text(manifest_text)
    out = artifact(Artifact, tmp_path / "plan.json")
    result = plan_batch.python_func(
        manifest_uri=str(manifest),
        base_model=tiny_model_dir,
        batch_root=str(tmp_path / "b"),
        job_id="j1",
        plan=out,
    )
    return result, out


def test_plan(tmp_path, tiny_model_dir):
    from dreambooth_lib import identifier
    from dreambooth_lib.config import IdentifierConfig

    fixed = identifier.run(tiny_model_dir, "backpack", IdentifierConfig(seed=7)).identifier
    text = f"""subjects:
  - {{name: rex, class_noun: dog, images: /data/rex}}
  - {{name: fido, class_noun: dog, images: /data/fido, live: true}}
  - {{name: pack, class_noun: backpack, images: /data/pack, identifier: {fixed}}}
  - {{name: Not A Slug, class_noun: dog, images: /data/x}}
  - {{name: rex, class_noun: dog, images: /data/rex2}}
"""
    subjects, out = _plan(tmp_path, tiny_model_dir, text)
    assert [s["name"] for s in subjects] == ["rex", "fido", "pack"]
    identifiers = [s["identifier"] for s in subjects]
    assert len(set(identifiers)) == 3 and identifiers[2] == fixed
    assert {s["prior_root"] for s in subjects} == {str(tmp_path / "b" / "priors")}
    assert (
        len({s["base_model_digest"] for s in subjects}) == 1 and len(subjects[0]["base_model_digest"]) == 64
    )
    status = tmp_path / "b" / "j1" / "status"
    bad_name = json.loads((status / "_rejected-3.json").read_text())
    assert bad_name["subject"] == "Not A Slug" and bad_name["error"].count("subjects[3]") == 1
    assert "appears twice" in json.loads((status / "_rejected-4.json").read_text())["error"]
    assert json.loads(Path(out.path).read_text())["classes"] == ["backpack", "dog"]
    assert out.metadata == {"num_subjects": 3, "num_failed": 2, "classes": ["backpack", "dog"]}


def test_unreadable_manifest_fails_the_run(tmp_path, tiny_model_dir):
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="non-empty list under 'subjects'"):
        _plan(tmp_path, tiny_model_dir, "{}", name="m.json")
    with pytest.raises(ConfigError, match="manifest not found"):
        plan_batch.python_func(
            manifest_uri=str(tmp_path / "none.yaml"), base_model=tiny_model_dir, batch_root=str(tmp_path),
            job_id="j", plan=artifact(Artifact, tmp_path / "p"),
        )  # fmt: skip
