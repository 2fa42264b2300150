"""make_prior_set: a set in the task's own artifact, or found again in a shared root; 0 images or λ 0 turn it off."""

from pathlib import Path

import pytest
from kfp.dsl import Dataset

from components.conftest import artifact
from components.prior.component import make_prior_set
from dreambooth_lib import prior

OPTIONS = {"steps": 2, "batch_size": 2}


def make_dog_prior(model: str, prior_set: Dataset, **parameters):
    """The component's function on "a dog" at 64 px from `model`, writing `prior_set`."""
    return make_prior_set.python_func(
        base_model=model,
        base_model_digest="d",
        class_noun="dog",
        resolution=64,
        prior_set=prior_set,
        **parameters,
    )


def test_own_artifact_then_shared_cache(tiny_model_dir, tmp_path):
    own = artifact(Dataset, tmp_path / "own")
    key, n, weight = make_dog_prior(
        tiny_model_dir, own, prior_size=2, prior_loss_weight=0.5, prior_root="", prior_options=OPTIONS
    )
    assert n == 2 and own.metadata["key"] == key and own.metadata["generated"] == 2
    assert weight == 0.5 and own.metadata["prior_preservation"] is True
    # a consumer reads the set where the launcher staged the artifact for it, not where the producer wrote it
    moved = tmp_path / "staged-in"
    (tmp_path / "own").rename(moved)
    ref = prior.open_artifact(str(moved))
    assert ref.key == key and [Path(u).parent.parent for u in ref.images] == [moved, moved]
    assert all(Path(u).is_file() for u in ref.images)
    shared = str(tmp_path / "priors")
    for i in range(2):  # the second subject of the class finds the set made by the first
        out = artifact(Dataset, tmp_path / f"s{i}")
        again = make_dog_prior(tiny_model_dir, out, prior_size=2, prior_root=shared, prior_options=OPTIONS)
        assert again[0] == key and out.metadata["reused"] == 2 * i
        ref = prior.open_artifact(out.path)  # the artifact names the shared set's durable URI
        assert ref.uri == str(Path(shared) / key) and len(ref.images) == 2
        assert not list(Path(out.path).glob("*.png"))


@pytest.fixture
def no_pipeline(monkeypatch):
    """Any pipeline load fails the test: an empty prior set must not load the model."""
    from dreambooth_lib import models

    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline was called")

    monkeypatch.setattr(models, "load_pipeline", refuse)


def test_zero_loss_weight_samples_nothing(tiny_model_dir, tmp_path, no_pipeline):
    """λ 0 with the default 200 images: no prior preservation, so no image is sampled and no model is loaded."""
    out = artifact(Dataset, tmp_path / "p")
    _, n, weight = make_dog_prior(tiny_model_dir, out, prior_size=200, prior_loss_weight=0.0, prior_root="")
    assert n == 0 and weight == 0.0 and prior.open_artifact(out.path).images == []
    assert out.metadata["prior_preservation"] is False and "warning" not in out.metadata


def test_zero_images_turns_the_prior_off_and_fine_tune_gets_no_weight(
    tiny_model_dir, tmp_path, no_pipeline, caplog
):
    """prior_size 0 with λ > 0: the prior is off (λ 0 for fine-tune, which would refuse λ > 0 without images),
    and the log and the artifact say why."""
    out = artifact(Dataset, tmp_path / "p")
    _, n, weight = make_dog_prior(tiny_model_dir, out, prior_size=0, prior_loss_weight=1.0, prior_root="")
    assert n == 0 and weight == 0.0 and prior.open_artifact(out.path).images == []
    warning = out.metadata["warning"]
    assert warning.startswith("prior_size is 0 but prior_loss_weight is 1.0: prior preservation is off")
    assert "set prior_loss_weight: 0" in warning and warning in caplog.text


def test_an_artifact_that_is_not_a_prior_set_is_refused(tmp_path):
    from dreambooth_lib.errors import StorageError

    with pytest.raises(StorageError, match="make_prior_set"):
        prior.open_artifact(str(tmp_path))
