"""Model loading rules and the tiny model with the real CLIP vocabulary."""

import numpy as np
import pytest

from dreambooth_lib import models, storage
from dreambooth_lib.errors import ModelLoadError
from dreambooth_lib.testing import tiny_models


def test_real_clip_vocabulary_matches_stable_diffusion():
    vocab, merges = models.clip_bpe_vocab_and_merges()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["dog</w>"] == 1929 and vocab["sks</w>"] == 48136


def test_tiny_model_loads_with_diffusers_and_generates(tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, use_safetensors=True, safety_checker=None)
    # the same ids as Stable Diffusion 1.x's tokenizer
    assert pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    image = pipe(
        "a dog", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    size = sum(p.stat().st_size for p in __import__("pathlib").Path(tiny_model).rglob("*") if p.is_file())
    assert size < 20 * 2**20  # a few MB
    assert not list(__import__("pathlib").Path(tiny_model).rglob("*.bin"))


def test_tiny_model_is_deterministic_in_seed(tmp_path, tiny_model):
    a = tiny_models.build_tiny_model(tmp_path / "a", seed=0)
    b = tiny_models.build_tiny_model(tmp_path / "c", seed=1)
    ua = (a / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (
        ua
        == (
            models.resolve_model_dir(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors"
        ).read_bytes()
    )
    assert ua != (b / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    d = tmp_path / "m" / "unet"
    d.mkdir(parents=True)
    (d / "diffusion_pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="pickle") as err:
        models.resolve_model_dir(str(tmp_path / "m"))
    assert "allow_pickle" in str(err.value)
    assert models.resolve_model_dir(str(tmp_path / "m"), allow_pickle=True) == tmp_path / "m"
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        models.resolve_model_dir(str(tmp_path / "model.ckpt"))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        models.resolve_model_dir(str(tmp_path / "nope"))


def test_hub_id_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub could not serve it"):
        models.resolve_model_dir("someorg/some-model", cache_dir=tmp_path)


def test_gcs_model_downloads_once_into_a_content_keyed_cache(tiny_model, gcs_bucket, tmp_path):
    uri = gcs_bucket + "/models/tiny"
    storage.copy_prefix(tiny_model, uri)
    first = models.resolve_model_dir(uri, cache_dir=tmp_path)
    assert (first / "model_index.json").exists()
    marker = first / "unet" / "config.json"
    mtime = marker.stat().st_mtime_ns
    assert models.resolve_model_dir(uri, cache_dir=tmp_path) == first
    assert marker.stat().st_mtime_ns == mtime  # not downloaded again
    # a changed object gives a new key (no stale cache)
    storage.write_text(uri + "/scheduler/scheduler_config.json", '{"_class_name": "DDPMScheduler"}')
    assert models.resolve_model_dir(uri, cache_dir=tmp_path) != first


def test_load_pipeline_from_gcs_generates_same_image(tiny_model, gcs_bucket, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path))
    uri = gcs_bucket + "/tiny"
    storage.copy_prefix(tiny_model, uri)
    images = []
    for source in (tiny_model, uri):
        pipe = models.load_pipeline(source)
        images.append(
            np.asarray(
                pipe(
                    "a dog",
                    num_inference_steps=2,
                    height=64,
                    width=64,
                    generator=torch.Generator().manual_seed(0),
                ).images[0]
            )
        )
    assert np.array_equal(images[0], images[1])


def test_model_digest_is_content_based(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert models.model_digest(str(copy)) == models.model_digest(tiny_model)


def test_a_model_has_one_digest_on_gcs_and_on_disk(tiny_model, gcs_bucket, tmp_path):
    """Prior-set reuse and identifier uniqueness key on the digest: the same bytes give the same key wherever
    they live (a gs:// prefix, a local copy, a /gcs/ mount), and other bytes another."""
    import shutil

    from dreambooth_lib import storage

    uri = f"{gcs_bucket}/models/tiny"
    storage.copy_prefix(tiny_model, uri)
    assert models.model_digest(uri) == models.model_digest(tiny_model)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    (changed / "scheduler" / "scheduler_config.json").write_text("{}")
    storage.copy_prefix(str(changed), f"{gcs_bucket}/models/changed")
    assert models.model_digest(f"{gcs_bucket}/models/changed") == models.model_digest(str(changed))
    assert models.model_digest(str(changed)) != models.model_digest(tiny_model)
