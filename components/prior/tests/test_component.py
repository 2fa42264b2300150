"""make_prior_set: a set in the task's own artifact, or found again in a shared root; 0 images turns it off."""

import json
from pathlib import Path

from kfp.dsl import Dataset

from components.conftest import artifact
from components.prior.component import make_prior_set

OPTIONS = {"steps": 2, "batch_size": 2}


def test_own_artifact_then_shared_cache(tiny_model_dir, tmp_path):
    own = artifact(Dataset, tmp_path / "own")
    uri, key, n = make_prior_set.python_func(
        base_model=tiny_model_dir, base_model_digest="d", class_noun="dog", resolution=64, prior_size=2,
        prior_root="", prior_set=own, prior_options=OPTIONS,
    )  # fmt: skip
    assert n == 2 and uri.startswith(str(tmp_path / "own")) and len(list(Path(uri).glob("*.png"))) == 2
    assert own.metadata["key"] == key and own.metadata["generated"] == 2
    shared = str(tmp_path / "priors")
    for i in range(2):  # the second subject of the class finds the set made by the first
        out = artifact(Dataset, tmp_path / f"s{i}")
        again = make_prior_set.python_func(
            base_model=tiny_model_dir, base_model_digest="d", class_noun="dog", resolution=64, prior_size=2,
            prior_root=shared, prior_set=out, prior_options=OPTIONS,
        )  # fmt: skip
        assert again[1] == key and out.metadata["reused"] == 2 * i
        assert json.loads((tmp_path / f"s{i}" / "prior_set.json").read_text())["uri"] == again[0]


def test_zero_images_disables(tiny_model_dir, tmp_path):
    uri, _, n = make_prior_set.python_func(
        base_model=tiny_model_dir, base_model_digest="d", class_noun="dog", resolution=64, prior_size=0,
        prior_root="", prior_set=artifact(Dataset, tmp_path / "p"),
    )  # fmt: skip
    assert (uri, n) == ("", 0)
