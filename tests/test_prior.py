"""The class-prior set: content-addressed key, reuse at zero cost, extension and resume with identical pixels."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_lib import models, prior, storage
from dreambooth_lib.config import PriorConfig
from dreambooth_lib.errors import ConfigError, StorageError
from dreambooth_lib.models import sampling

FAST = {"steps": 2, "batch_size": 2, "seed": 3}  # the tiny model at 64 px: a few tens of ms per image


def _config(num_images: int, **overrides) -> PriorConfig:
    return PriorConfig(num_images=num_images, **{**FAST, **overrides})


@pytest.fixture
def no_pipeline(monkeypatch):
    """Any pipeline load fails the test: a reused set must cost nothing."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline was called")

    monkeypatch.setattr(models, "load_pipeline", refuse)


@pytest.fixture
def counted_sampling(monkeypatch):
    """Records every seed sampled, so a test can tell exactly which images were (re)drawn."""
    seeds: list[int] = []
    real = sampling.sample_images

    def counting(pipe, prompts, image_seeds, **kwargs):
        seeds.extend(image_seeds)
        return real(pipe, prompts, image_seeds, **kwargs)

    monkeypatch.setattr(sampling, "sample_images", counting)
    return seeds


def _pixels(uri: str) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB").tobytes()


def test_class_prompt_is_the_papers():
    assert prior.class_prompt("dog") == "a dog"
    assert prior.class_prompt(" teddy bear ") == "a teddy bear"
    with pytest.raises(ConfigError, match="class_noun"):
        prior.class_prompt("  ")


def test_preservation_is_off_when_either_setting_is_zero():
    assert prior.preservation(200, 1.0) == prior.Preservation(on=True, prior_loss_weight=1.0, samples=True)
    # the model-output prior samples nothing, with any number of images asked for
    assert prior.preservation(0, 1.0, mode="model_output") == prior.Preservation(
        on=True, prior_loss_weight=1.0
    )
    assert prior.preservation(200, 0.0) == prior.Preservation(on=False, prior_loss_weight=0.0)
    assert prior.preservation(0, 0.0) == prior.Preservation(on=False, prior_loss_weight=0.0)
    # no images but λ > 0: read as off (λ 0), with a warning that names the caller's inputs and the fix
    off = prior.preservation(0, 0.5, num_images_name="prior_size", weight_name="prior_loss_weight")
    assert not off.on and off.prior_loss_weight == 0.0
    assert off.warning.startswith("prior_size is 0 but prior_loss_weight is 0.5: prior preservation is off")
    assert "set prior_loss_weight: 0 to say so, or prior_size > 0" in off.warning


def test_key_changes_with_each_field_and_ignores_number_types():
    base = dict(
        model_digest="ab" * 32,
        class_prompt="a dog",
        sampler="dpm++",
        steps=25,
        guidance=7.5,
        resolution=512,
        seed=0,
        family="sd",
    )
    key = prior.prior_set_key(prior.key_fields(**base))
    assert len(key) == 16 and int(key, 16) >= 0
    assert prior.prior_set_key(prior.key_fields(**base)) == key  # stable
    changed = {
        "model_digest": "cd" * 32,
        "class_prompt": "a cat",
        "sampler": "ddim",
        "steps": 50,
        "guidance": 5.0,
        "resolution": 768,
        "seed": 1,
        "family": "sdxl",
    }
    keys = {
        prior.prior_set_key(prior.key_fields(**{**base, field: value})) for field, value in changed.items()
    }
    assert len(keys) == len(changed) and key not in keys
    assert prior.prior_set_key(prior.key_fields(**{**base, "guidance": None})) != key
    assert prior.key_fields(**{**base, "guidance": 7}) == prior.key_fields(**{**base, "guidance": 7.0})


def test_zero_images_loads_nothing(tmp_path, monkeypatch, no_pipeline):
    monkeypatch.setattr(models, "model_digest", lambda *a, **k: pytest.fail("model_digest was called"))
    result = prior.run("no/such-model", "dog", _config(0), root=str(tmp_path / "priors"), resolution=64)
    assert (result.num_images, result.images, result.generated, result.uri) == (0, [], 0, "")
    assert not (tmp_path / "priors").exists()


def test_make_then_reuse_without_loading(tiny_model, tmp_path, monkeypatch):
    root = str(tmp_path / "priors")
    first = prior.run(tiny_model, "dog", _config(3), root=root, resolution=64)
    key = prior.prior_set_key(
        prior.key_fields(models.model_digest(tiny_model), "a dog", "dpm++", 2, None, 64, 3, "sd")
    )
    assert first.key == key and first.uri == str(Path(root, key))
    assert (first.generated, first.reused, first.num_images) == (3, 0, 3)
    assert first.guidance_scale == 7.5  # the pipeline default, recorded once known
    names = sorted(p.name for p in Path(first.uri).iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "prior_set.json"]  # no temp files left
    record = storage.read_json(storage.join(first.uri, "prior_set.json"))
    assert record["count"] == 3 and record["model"] == tiny_model and record["class_prompt"] == "a dog"
    assert record["model_digest"] == first.model_digest and record["guidance_scale"] is None

    from PIL import Image

    assert Image.open(first.images[0]).size == (64, 64)

    # a second subject of the same class: no pipeline, same images
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("load_pipeline was called"))
    again = prior.run(tiny_model, " dog", _config(2), root=root, resolution=64)
    assert (again.generated, again.reused, again.num_images) == (0, 2, 2)
    assert again.images == first.images[:2] and again.guidance_scale == 7.5
    assert prior.load_prior_images(first.uri) == first.images
    assert prior.load_prior_images(first.uri, n=2) == first.images[:2]
    with pytest.raises(StorageError, match="holds 3 prior images, 5 were asked"):
        prior.load_prior_images(first.uri, n=5)


def test_extension_gives_the_pixels_of_a_single_run(tiny_model, tmp_path, counted_sampling):
    small = prior.run(tiny_model, "dog", _config(3), root=str(tmp_path / "a"), resolution=64)
    assert counted_sampling == [sampling.image_seed(3, i) for i in range(4)]  # batches are always full
    counted_sampling.clear()
    extended = prior.run(tiny_model, "dog", _config(5), root=str(tmp_path / "a"), resolution=64)
    assert (extended.generated, extended.reused) == (2, 3)
    # image 2 is drawn again only as a batch neighbour: its file is not rewritten
    assert counted_sampling == [sampling.image_seed(3, i) for i in range(2, 6)]
    assert extended.images[:3] == small.images
    assert sorted(p.name for p in Path(extended.uri).glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert storage.read_json(storage.join(extended.uri, "prior_set.json"))["count"] == 5

    whole = prior.run(tiny_model, "dog", _config(5), root=str(tmp_path / "b"), resolution=64)
    assert whole.key == extended.key
    for a, b in zip(extended.images, whole.images, strict=True):
        assert _pixels(a) == _pixels(b)
    assert _pixels(whole.images[0]) != _pixels(whole.images[1])  # distinct seeds, distinct images


def test_interrupted_run_continues_without_redrawing(tiny_model, tmp_path, monkeypatch):
    root = str(tmp_path / "priors")
    real = sampling.sample_images
    calls = {"n": 0}

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the pod is killed mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_images", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prior.run(tiny_model, "dog", _config(4), root=root, resolution=64)
    (set_dir,) = Path(root).iterdir()
    assert sorted(p.name for p in set_dir.iterdir()) == ["000000.png", "000001.png"]  # whole files only

    seeds: list[int] = []
    monkeypatch.setattr(
        sampling, "sample_images", lambda p, pr, s, **k: seeds.extend(s) or real(p, pr, s, **k)
    )
    resumed = prior.run(tiny_model, "dog", _config(4), root=root, resolution=64)
    assert (resumed.generated, resumed.reused) == (2, 2)
    assert seeds == [sampling.image_seed(3, 2), sampling.image_seed(3, 3)]
    assert not [p for p in set_dir.iterdir() if p.name.startswith(".tmp-")]

    # a gap (a lost file): only the missing index is written, with its old pixels; the others stay untouched
    lost = _pixels(resumed.images[1])
    Path(resumed.images[1]).unlink()
    assert prior.load_prior_images(resumed.uri) == resumed.images[:1]  # a set ends at its first gap
    before = {u: Path(u).stat().st_mtime_ns for u in resumed.images if Path(u).exists()}
    seeds.clear()
    healed = prior.run(tiny_model, "dog", _config(4), root=root, resolution=64)
    assert seeds == [sampling.image_seed(3, 0), sampling.image_seed(3, 1)]  # the batch holding index 1
    assert (healed.generated, healed.reused) == (1, 3)
    assert _pixels(healed.images[1]) == lost
    assert {u: Path(u).stat().st_mtime_ns for u in before} == before


def test_folder_with_other_settings_is_refused(tiny_model, tmp_path, no_pipeline):
    key = prior.prior_set_key(
        prior.key_fields(models.model_digest(tiny_model), "a dog", "dpm++", 2, None, 64, 3, "sd")
    )
    storage.write_json(str(tmp_path / key / "prior_set.json"), {"class_prompt": "a cat", "steps": 2})
    with pytest.raises(
        StorageError, match=r"prior_set.json: this folder holds a prior set made with other settings"
    ):
        prior.run(tiny_model, "dog", _config(1), root=str(tmp_path), resolution=64)


def test_gcs_root(tiny_model, gcs_bucket, monkeypatch):
    root = f"{gcs_bucket}/priors"
    made = prior.run(tiny_model, "backpack", _config(2, resolution=64), root=root, resolution=512)
    assert made.uri == f"{root}/{made.key}" and made.resolution == 64
    assert storage.list_files(made.uri) == [*made.images, f"{made.uri}/prior_set.json"]
    assert storage.read_json(f"{made.uri}/prior_set.json")["count"] == 2

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("load_pipeline was called"))
    reused = prior.run(tiny_model, "backpack", _config(2, resolution=64), root=root, resolution=512)
    assert (reused.generated, reused.reused, reused.images) == (0, 2, made.images)
    assert prior.load_prior_images(made.uri) == made.images
