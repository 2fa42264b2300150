"""ingest_images: the adapter writes the library's outputs into the artifact and records counts and digest."""

import json

import pytest
from kfp.dsl import Dataset

from components.conftest import artifact
from components.ingest.component import ingest_images


def test_writes_images_manifest_and_metadata(photos, tmp_path):
    out = artifact(Dataset, tmp_path / "instance")
    n, digest = ingest_images.python_func(
        images_uri=str(photos), images_digest="abc", resolution=64, instance_images=out,
        ingest_options={"min_side": 64},
    )  # fmt: skip
    assert n == 4 and sorted(p.name for p in (tmp_path / "instance").glob("*.png")) == [
        f"{i:02d}.png" for i in range(4)
    ]
    assert json.loads((tmp_path / "instance" / "manifest.json").read_text())["digest"] == digest
    assert out.metadata["num_images"] == 4 and out.metadata["digest"] == digest
    assert out.metadata["source_digest"] == "abc" and out.metadata["resolution"] == 64


def test_bad_option_names_the_field(photos, tmp_path):
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="ingest_options.*min_sid"):
        ingest_images.python_func(
            images_uri=str(photos), images_digest="", resolution=64,
            instance_images=artifact(Dataset, tmp_path / "x"), ingest_options={"min_sid": 64},
        )  # fmt: skip


def test_local_run(local_kfp, photos):
    task = ingest_images(
        images_uri=str(photos), images_digest="d", resolution=64, ingest_options={"min_side": 64}
    )
    assert task.outputs["num_images"] == 4
    dataset = task.outputs["instance_images"]
    assert dataset.metadata["digest"] == task.outputs["digest"]
    assert len(list(__import__("pathlib").Path(dataset.path).glob("*.png"))) == 4
