"""People as subjects: a person without a consent record is refused before any work; the record reaches the ingest
manifest, the registry's lineage and the model card; ingest's face check warns about an undeclared person."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dreambooth_lib import consent, ingest, storage
from dreambooth_lib.cli import app
from dreambooth_lib.config import IngestConfig, RunConfig
from dreambooth_lib.errors import ConfigError

RECORD = {"given_by": "Ada Example", "date": "2026-11-30", "reference": "consent-forms/2026-0042"}


def _run_config(tiny_model, tiny_evaluators, subject_dir, tmp_path, **subject) -> dict:
    return {
        "base_model": tiny_model,
        "run_dir": str(tmp_path / "run"),
        "subject": {"name": "ada", "class_noun": "woman", "images": str(subject_dir), **subject},
        "ingest": {"resolution": 64, "min_side": 64},
        "prior": {"num_images": 0},
        "train": {"steps": 1, "resolution": 64, "prior_loss_weight": 0.0, "checkpoint_every": 0},
        "eval": {"dino_model": tiny_evaluators["dino"], "clip_model": tiny_evaluators["clip"]},
        "registry": {"uri": str(tmp_path / "registry")},
        "samples_per_prompt": 0,
        "evaluate": False,
    }


def test_a_person_without_consent_is_refused_with_exit_2_and_nothing_written(
    tiny_model, tiny_evaluators, subject_dir, tmp_path
):
    cfg = _run_config(tiny_model, tiny_evaluators, subject_dir, tmp_path, kind="person")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert "is a person (kind: person) but has no consent record" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "registry").exists()


def test_the_consent_record_reaches_the_manifest_lineage_and_card(
    tiny_model, tiny_evaluators, subject_dir, tmp_path
):
    from dreambooth_lib.runs import personalize

    cfg = _run_config(tiny_model, tiny_evaluators, subject_dir, tmp_path, kind="person", consent=RECORD)
    config = RunConfig.model_validate(cfg)
    assert config.subject.live  # a person is a live subject: the paper's live prompts
    result = personalize.run(config)
    manifest = json.loads((tmp_path / "run" / "ingest" / "manifest.json").read_text())
    assert manifest["subject"]["kind"] == "person" and manifest["subject"]["consent"] == RECORD
    lineage = json.loads(storage.read_text(result.registered["lineage_uri"]))
    assert lineage["subject_record"]["consent"] == RECORD
    card = storage.read_text(result.registered["card_uri"])
    assert "## Subject and consent" in card
    assert "consent given by `Ada Example` on `2026-11-30`; record: `consent-forms/2026-0042`" in card


def test_the_batch_manifest_rejects_only_the_person_without_consent(tmp_path):
    from dreambooth_lib.runs.batch.manifest import load_manifest

    subjects = [
        {"name": "ada", "class_noun": "woman", "images": "a/", "kind": "person", "consent": RECORD},
        {"name": "bob", "class_noun": "man", "images": "b/", "kind": "person"},
        {"name": "rex", "class_noun": "dog", "images": "c/", "kind": "animal"},
    ]
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"subjects": subjects}))
    manifest = load_manifest(str(path))
    assert [e.name for e in manifest.entries] == ["ada", "rex"]
    (rejected,) = manifest.rejected
    assert rejected.name == "bob" and "subjects[1]" in rejected.error and "consent" in rejected.error
    assert manifest.entries[0].consent.reference == RECORD["reference"] and manifest.entries[1].live


def test_ingest_refuses_a_person_without_consent_before_reading_anything(tmp_path):
    with pytest.raises(ConfigError, match="no consent record"):
        ingest.run(str(tmp_path / "missing"), str(tmp_path / "out"), IngestConfig(), subject_kind="person")
    with pytest.raises(ConfigError, match="reference"):
        ingest.run(str(tmp_path / "missing"), str(tmp_path / "out"), IngestConfig(), subject_kind="person",
                   consent={"given_by": "Ada", "date": "2026-11-30"})  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("detector", "kind", "faces", "warned"),
    [
        (None, "object", "not checked: no face detector is installed", False),
        (lambda image: 1, "object", "found in 3 of 3 photos", True),
        (lambda image: 1, "person", "found in 3 of 3 photos", False),
        (lambda image: 0, "object", "none found", False),
    ],
)
def test_ingest_face_check(tmp_path, monkeypatch, detector, kind, faces, warned):
    from dreambooth_lib.testing.synthetic import make_subject_images

    monkeypatch.setattr(consent, "face_counter", lambda: detector)
    photos = make_subject_images(tmp_path / "photos", n=3, size=64)
    record = RECORD if kind == "person" else None
    result = ingest.run(str(photos), str(tmp_path / "out"), IngestConfig(resolution=64, min_side=64),
                        subject_kind=kind, consent=record)  # fmt: skip
    assert result.subject.faces.startswith(faces)
    assert any("faces found in 3 of 3 photos" in w for w in result.warnings) == warned


def test_dreambooth_ingest_takes_the_kind_and_the_consent_record(tmp_path):
    from dreambooth_lib.testing.synthetic import make_subject_images

    photos = str(make_subject_images(tmp_path / "photos", n=3, size=64))
    args = [
        "ingest",
        photos,
        str(tmp_path / "out"),
        "--class-noun",
        "woman",
        "--resolution",
        "64",
        "--min-side",
        "64",
    ]
    refused = CliRunner().invoke(app, [*args, "--kind", "person", "--consent-given-by", "Ada Example"])
    assert refused.exit_code == 2 and "consent" in refused.output and "reference" in refused.output
    assert not (tmp_path / "out").exists()
    record = [
        "--consent-given-by",
        "Ada Example",
        "--consent-date",
        "2026-11-30",
        "--consent-reference",
        "f/42",
    ]
    done = CliRunner().invoke(app, [*args, "--kind", "person", *record, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["subject"]["consent"] == {"given_by": "Ada Example", "date": "2026-11-30",
                                                             "reference": "f/42"}  # fmt: skip
