"""generate: prompts -> out/<slug>/NN.png + generate.json, seeded per image index, from a full model or a LoRA."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dreambooth_lib import generate, models, storage
from dreambooth_lib.errors import ConfigError, ModelLoadError
from dreambooth_lib.models import sampling

FAST = {"steps": 2, "resolution": 64}


def _pixels(uri: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB").tobytes()


def test_slugify():
    assert generate.slugify("A photo of a muh Dog, on the beach!") == "a-photo-of-a-muh-dog-on-the-beach"
    assert generate.slugify("  ~~~ ") == "prompt"
    long = generate.slugify("a " + "very " * 30 + "long prompt")
    assert len(long) <= 60 and not long.endswith("-")
    slugs = generate.unique_slugs(["a dog", "A Dog!", "a-dog-2", "a dog", "x" * 80, "x" * 90])
    assert slugs[:4] == ["a-dog", "a-dog-2", "a-dog-2-2", "a-dog-3"]
    assert slugs[4] == "x" * 60 and slugs[5] == "x" * 58 + "-2"
    assert len(set(slugs)) == len(slugs)


def test_png_bytes_are_lossless_and_a_content_key():
    """Every step writes images through png_bytes: pixels read back unchanged, and equal pixels give equal bytes
    (ingest's and the prior set's digests are keys of the content)."""
    import numpy as np
    from PIL import Image

    from dreambooth_lib.images import png_bytes

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert png_bytes(Image.fromarray(pixels.copy())) == data


def test_bad_arguments_fail_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("load_pipeline was called"))
    with pytest.raises(ConfigError, match="no prompts"):
        generate.run("m", [], str(tmp_path))
    with pytest.raises(ConfigError, match="n .images per prompt. is 0"):
        generate.run("m", ["a dog"], str(tmp_path), n=0)
    with pytest.raises(ConfigError, match="sampler 'dpm' is unknown"):
        generate.run("m", ["a dog"], str(tmp_path), sampler="dpm")


def test_writes_images_and_record_deterministically(tiny_model, tmp_path):
    prompts = ["a muh dog", "a muh dog on the beach", "A muh dog!"]
    out = tmp_path / "samples"
    result = generate.run(tiny_model, prompts, str(out), n=2, seed=5, batch_size=4, **FAST)

    assert result.slugs == ["a-muh-dog", "a-muh-dog-on-the-beach", "a-muh-dog-2"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([f"{s}/{j:02d}.png" for s in result.slugs for j in range(2)] + ["generate.json"])
    record = json.loads((out / "generate.json").read_text())
    assert record["model"] == tiny_model and record["guidance_scale"] == 7.5 and record["resolution"] == 64
    rows = [(r["prompt"], r["index"], r["seed"]) for r in record["images"]]
    # image j of every prompt shares the seed image_seed(seed, j): prompts are compared at fixed seeds
    assert rows == [(p, j, sampling.image_seed(5, j)) for p in prompts for j in range(2)]
    assert all(Path(r["uri"]).parent.name in result.slugs for r in record["images"])

    from PIL import Image

    assert Image.open(result.images[0].uri).size == (64, 64)
    again = generate.run(tiny_model, prompts[:1], str(tmp_path / "again"), n=2, seed=5, batch_size=4, **FAST)
    assert [_pixels(i.uri) for i in again.images] == [_pixels(i.uri) for i in result.images[:2]]
    other = generate.run(tiny_model, prompts[:1], str(tmp_path / "other"), n=1, seed=6, **FAST)
    assert _pixels(other.images[0].uri) != _pixels(result.images[0].uri)
    assert not list(out.rglob(".tmp-*"))


def _make_lora(tiny_model: str, out: Path, base_model: str) -> Path:
    """A LoRA artifact as training writes it: peft adapter on the UNet attention, nonzero B, marker file."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(0)  # A is drawn from the global RNG too: the same seed gives the same adapter
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero (adapter = identity); training would have moved it
                param.normal_(0, 0.5)
    out.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        weight_name=models.LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    marker = {"base_model": base_model, "rank": 4, "alpha": 4.0, "identifier": "muh", "class_noun": "dog"}
    (out / models.LORA_MARKER_NAME).write_text(json.dumps(marker))
    return out


def test_lora_folder_loads_base_plus_adapter(tiny_model, tmp_path, gcs_bucket):
    lora = _make_lora(tiny_model, tmp_path / "lora", base_model=tiny_model)
    base = generate.run(tiny_model, ["a muh dog"], str(tmp_path / "base"), n=1, seed=1, **FAST)
    tuned = generate.run(str(lora), ["a muh dog"], str(tmp_path / "tuned"), n=1, seed=1, **FAST)
    assert _pixels(tuned.images[0].uri) != _pixels(base.images[0].uri)

    # base_model overrides the recorded base (here one that no longer exists); output to gs:// works as well
    moved = _make_lora(tiny_model, tmp_path / "moved", base_model=str(tmp_path / "gone"))
    out = f"{gcs_bucket}/samples"
    again = generate.run(str(moved), ["a muh dog"], out, n=1, seed=1, base_model=tiny_model, **FAST)
    assert again.base_model == tiny_model
    assert storage.list_files(out) == [f"{out}/a-muh-dog/00.png", f"{out}/generate.json"]
    assert _pixels(again.images[0].uri) == _pixels(tuned.images[0].uri)
    assert storage.read_json(f"{out}/generate.json")["images"][0]["uri"] == f"{out}/a-muh-dog/00.png"


def test_diffusers_lora_folder_renders_on_the_base_model_given(tiny_model, tmp_path):
    """A LoRA folder as diffusers' train_dreambooth_lora.py writes it (the weights alone, no dreambooth_lora.json)
    renders on base_model (--base-model) exactly as our LoRA folder does; without one it is refused with a
    ModelLoadError naming the flag."""
    ours = _make_lora(tiny_model, tmp_path / "ours", base_model=tiny_model)
    plain = _make_lora(tiny_model, tmp_path / "plain", base_model=tiny_model)
    (plain / models.LORA_MARKER_NAME).unlink()
    with pytest.raises(ModelLoadError, match="does not name its base model.*--base-model"):
        generate.run(str(plain), ["a muh dog"], str(tmp_path / "refused"), n=1, **FAST)
    assert not (tmp_path / "refused").exists()

    rendered = generate.run(
        str(plain), ["a muh dog"], str(tmp_path / "plain-out"), n=1, seed=1, base_model=tiny_model, **FAST
    )
    expected = generate.run(str(ours), ["a muh dog"], str(tmp_path / "ours-out"), n=1, seed=1, **FAST)
    assert rendered.base_model == tiny_model
    assert _pixels(rendered.images[0].uri) == _pixels(expected.images[0].uri)
