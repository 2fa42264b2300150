"""train_packed_loras: its parameters build the subject step's RunConfig values, and the outcome is reported."""

from pathlib import Path

from kfp.dsl import Markdown

from components.batch_train_packed.component import train_packed_loras
from components.conftest import artifact


def test_parameters_reach_train_pack_and_the_outcome_is_reported(tmp_path, monkeypatch):
    from dreambooth_lib.runs.batch import pack, subject

    seen = {}

    def fake_train_pack(subjects, base_model, batch_root, job_id, run_options, pack_size=0, **kwargs):
        seen.update(
            subjects=subjects, base_model=base_model, job_id=job_id, options=run_options, size=pack_size
        )
        return [
            pack.PackStatus(subject="rex", packed=True, model_uri="m"),
            pack.PackStatus(subject="cup", packed=False, reason="IngestError: no photos"),
        ]

    monkeypatch.setattr(pack, "train_pack", fake_train_pack)
    out = artifact(Markdown, tmp_path / "packing.md")
    subjects = [{"name": n, "class_noun": "dog", "images": f"/d/{n}", "identifier": "zwx",
                 "base_model_digest": "md", "prior_root": "/priors"} for n in ("rex", "cup")]  # fmt: skip
    count = train_packed_loras.python_func(
        subjects=subjects, base_model="base", batch_root=str(tmp_path / "b"), job_id="j1", packing=out,
        pack_size=3, resolution=64, steps=5, prior_loss_weight=1.0, prior_size=4, mode="lora",
        prior_options={"steps": 2},
        run_options={"ingest": {"min_side": 64}, "train": {"lora_rank": 2}},
    )  # fmt: skip
    assert count == 1 and seen["size"] == 3 and seen["job_id"] == "j1" and seen["subjects"] == subjects
    options = seen["options"]
    # exactly what personalize_subject builds, so the subject step finds the packed model as its own
    assert options == subject.subject_run_values(
        {"ingest": {"min_side": 64}, "train": {"lora_rank": 2}}, resolution=64, steps=5, prior_loss_weight=1.0,
        prior_size=4, prior_root="/priors", mode="lora", prior_options={"steps": 2},
    )  # fmt: skip
    assert options["train"] == {"lora_rank": 2, "steps": 5, "prior_loss_weight": 1.0, "mode": "lora",
                                "resolution": 64}  # fmt: skip
    text = Path(out.path).read_text()
    assert "- rex: trained in a pack" in text and "- cup: trains alone (IngestError: no photos)" in text
    assert out.metadata == {"packed": 1, "subjects": 2}
