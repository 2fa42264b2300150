"""The toy world: its generator, the shipped model (digests, loading, prompt following by the probe), the toy
evaluators in the evaluation's formats, the training script end to end on a few steps, and DreamBooth on it
(the identifier binds the subject; without prior preservation "a star" collapses to it, with λ = 1 it does not)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreambooth_lib.testing.toyworld import shipped, world


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Working copies of the shipped model and evaluators."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toyworld")
    return {"model": str(shipped.base_model(root / "model")), **shipped.evaluators(root / "evaluators")}


def test_world_is_deterministic_and_captions_name_the_labels():
    a, b = world.sample_world(64, seed=3), world.sample_world(64, seed=3)
    assert a == b and a != world.sample_world(64, seed=4)
    assert np.array_equal(world.images_array(a), world.images_array(b))
    for scene in a:
        shape, color, background = scene.labels
        assert scene.caption == f"a {list(world.COLORS)[color]} {world.SHAPES[shape]} on a " \
                                f"{list(world.BACKGROUNDS)[background]} background"  # fmt: skip
    # every caption of the world turns up in a modest sample
    assert len({s.caption for s in world.sample_world(2000, seed=0)}) == 48


def test_the_subject_is_something_the_world_never_draws(tmp_path):
    world_images = [world.render(s) for s in world.sample_world(300, seed=1)]
    assert not any(world.is_subject(img) for img in world_images)
    views = sorted(world.subject_images(tmp_path / "subject", n=4).glob("*.png"))
    from PIL import Image

    assert len(views) == 4 and all(world.is_subject(Image.open(p)) for p in views)


def test_shipped_files_match_their_digests():
    assert shipped.read_digest_file() == shipped.digests()
    record = shipped.training_record()
    assert record["config"]["seed"] == 0 and record["prompt_following"]["samples"] > 0
    total = sum(p.stat().st_size for p in shipped.shipped_files())
    assert total < 16 * 2**20, f"the shipped toy world grew to {total / 2**20:.1f} MB"
    configs = [json.loads(p.read_text()) for p in shipped.ASSET_DIR.rglob("config.json")]
    assert configs and not any("_name_or_path" in c for c in configs)  # no path of the machine that trained it
    unet = shipped.ASSET_DIR / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(unet), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in list(f.keys())[:5])


def test_shipped_model_loads_in_diffusers_and_follows_prompts(toy):
    """The working copy is an ordinary fp32 diffusers folder whose samples of 24 random captions the probe reads
    back as prompted: shape and colour nearly always, the background less often. (The full measurement, 4 samples
    of each of the 48 captions, is in training.json: shape 0.98, colour 1.00, background 0.65; chance 0.25 / 0.25 /
    0.33.)"""
    from diffusers import StableDiffusionPipeline

    from dreambooth_lib.models.sampling import sample_images
    from dreambooth_lib.testing.toyworld.probe import ATTRIBUTES, load_probe

    pipe = StableDiffusionPipeline.from_pretrained(toy["model"])
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    rng = np.random.default_rng(0)
    wanted = [world.random_scene(rng) for _ in range(24)]
    images = sample_images(
        pipe, [s.caption for s in wanted], list(range(24)), steps=20, resolution=32, batch_size=24
    )
    read = load_probe(toy["dino"]).classify(images)
    least = {"shape": 0.8, "color": 0.8, "background": 0.45}
    for i, (attribute, names) in enumerate(ATTRIBUTES.items()):
        hits = np.mean([r == names[s.labels[i]] for r, s in zip(read[attribute], wanted, strict=True)])
        assert hits >= least[attribute], f"{attribute}: {hits:.2f} of 24 samples as prompted"


def test_probe_reads_world_images_it_never_saw(toy):
    from dreambooth_lib.testing.toyworld.probe import load_probe

    scenes = world.sample_world(200, seed=12345)
    read = load_probe(toy["dino"]).classify(world.images_array(scenes))
    truth = {"shape": [s.shape for s in scenes], "color": [s.color for s in scenes],
             "background": [s.background for s in scenes]}  # fmt: skip
    for attribute, labels in truth.items():
        assert np.mean([a == b for a, b in zip(read[attribute], labels, strict=True)]) >= 0.95, attribute


def test_toy_evaluators_load_through_the_evaluation_code_and_are_labelled(toy):
    """The evaluation's own embedders load them; the toy CLIP matches world images to their captions."""
    from PIL import Image

    from dreambooth_lib.evaluate.embedders import ClipEmbedder, DinoEmbedder
    from dreambooth_lib.evaluate.evaluation import evaluator_label

    assert "toy" in evaluator_label(toy["dino"]) and "toy" in evaluator_label(toy["clip"])
    assert "toy" in evaluator_label(toy["lpips"])
    scenes = world.sample_world(64, seed=99)
    images = [Image.fromarray(a) for a in world.images_array(scenes)]
    assert DinoEmbedder(toy["dino"]).embed(images[:4]).shape[0] == 4
    clip = ClipEmbedder(toy["clip"])
    captions = sorted(
        {world.caption(s, c, b) for s in world.SHAPES for c in world.COLORS for b in world.BACKGROUNDS}
    )
    sims = clip.embed_images(images) @ clip.embed_texts(captions).T
    top1 = [captions[j] == s.caption for j, s in zip(sims.argmax(-1).tolist(), scenes, strict=True)]
    assert np.mean(top1) >= 0.5, f"image->caption top-1 {np.mean(top1):.2f} among 48 (chance 0.02)"


def test_training_script_writes_a_loadable_diffusers_folder_and_ships_it(tmp_path):
    """The regeneration path on a few steps: train -> diffusers folder -> ship (fp16 + digests) -> working copy."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_lib.testing.toyworld import train

    cfg = train.ToyTrainConfig(num_images=64, vae_steps=2, decoder_steps=2, vae_batch=4, unet_steps=2, batch=4,
                               offset_noise_steps=2, warmup=1, probe_steps=2, conv_probe_steps=2, clip_steps=2,
                               eval_samples_per_caption=0)  # fmt: skip
    record = train.run(tmp_path / "out", cfg)
    assert record["config"]["unet_steps"] == 2 and record["prompt_following"] is None
    # --reuse-model keeps the model and redoes the evaluators and the record
    unet = tmp_path / "out" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights = unet.read_bytes()
    again = train.run(tmp_path / "out", cfg, reuse_model=True)
    assert unet.read_bytes() == weights and again["vae_psnr_db"] == record["vae_psnr_db"]
    root = shipped.ship(tmp_path / "out", root=tmp_path / "assets")
    assert shipped.read_digest_file(root) == shipped.digests(root)
    assert not list(root.rglob("vocab.json"))  # the tokenizer is regenerated, not shipped
    copy = shipped.base_model(tmp_path / "copy", root=root)
    pipe = StableDiffusionPipeline.from_pretrained(str(copy))
    assert pipe.tokenizer("a red star").input_ids == [49406, 320, 736, 1565, 49407]
    assert json.loads((copy / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.slow
def test_dreambooth_binds_the_subject_and_prior_preservation_keeps_the_class(toy, tmp_path):
    """The paper's Table 3 in direction on the toy world. Without prior preservation "a star" collapses to the
    subject (PRES up, class-prompt diversity down); with λ = 1 it stays varied; the identifier prompt renders the
    subject far more often than the class prompt."""
    from dreambooth_lib.testing.toyworld import ablation

    result = ablation.run(toy["model"], toy, tmp_path)
    print(json.dumps(result, indent=1))
    base, without, with_prior = result["base"], result["without_prior"], result["with_prior"]
    assert (
        base["subject_rate_identifier"] == 0 and base["subject_rate_class"] == 0
    )  # the world cannot draw it
    assert with_prior["subject_rate_identifier"] >= with_prior["subject_rate_class"] + 0.5, result
    assert without["subject_rate_class"] >= with_prior["subject_rate_class"] + 0.3, result  # the collapse
    assert without["pres"] > with_prior["pres"], result
    assert without["div_class"] < with_prior["div_class"], result
