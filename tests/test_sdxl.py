"""SDXL base models: the same method (Eq. 2, cached latents, full or LoRA, packed LoRA) on a tiny SDXL pipeline.

SDXL conditions its UNet on more than the token embeddings: both text encoders' hidden states concatenated, the
second encoder's pooled projection, and six size/crop ids. Training must hand the UNet exactly what the
pipeline hands it when sampling, or the identifier is learnt under conditions sampling never reproduces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import models
from dreambooth_lib.config import (
    EvalConfig,
    IdentifierConfig,
    IngestConfig,
    PriorConfig,
    RunConfig,
    Subject,
)
from dreambooth_lib.models.families import StableDiffusionXL
from dreambooth_lib.runs import personalize
from dreambooth_lib.testing import evaluators, tiny_models
from dreambooth_lib.testing.synthetic import make_subject_images
from dreambooth_lib.testing.tiny_models import tiny_train_config
from dreambooth_lib.train import multi_subject as packed

SDXL = StableDiffusionXL()


def encode(pipe, prompts):
    """(embeds, added, input_ids by encoder) of the prompts as training conditions the UNet."""
    for name in SDXL.text_encoder_names:
        getattr(pipe, name).to("cpu")
    cond = SDXL.encode_prompts(pipe, prompts, torch.device("cpu"), RES)
    return cond.embeds, cond.added, cond.input_ids


RES = 32


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> str:
    return str(tiny_models.build_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl") / "model"))


def test_training_conditions_the_unet_as_the_pipeline_does(sdxl_model):
    """Prompt embeddings, pooled embeddings and time ids equal what StableDiffusionXLPipeline passes its UNet."""
    pipe = models.load_pipeline(sdxl_model)
    assert models.family_of(pipe).name == "sdxl"
    embeds, added, _ = encode(pipe, ["a sks dog", "a dog"])

    seen = {}

    def capture(module, args, kwargs):
        if "encoder_hidden_states" in kwargs and "embeds" not in seen:
            seen["embeds"] = kwargs["encoder_hidden_states"]
            seen["added"] = kwargs["added_cond_kwargs"]

    pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    pipe(["a sks dog", "a dog"], num_inference_steps=1, guidance_scale=1.0, height=RES, width=RES)
    torch.testing.assert_close(embeds, seen["embeds"].float())
    torch.testing.assert_close(added["text_embeds"], seen["added"]["text_embeds"].float())
    torch.testing.assert_close(added["time_ids"], seen["added"]["time_ids"].float())
    assert added["time_ids"][0].tolist() == [RES, RES, 0, 0, RES, RES]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sdxl_fine_tune_writes_a_loadable_model_that_moved(
    sdxl_model, two_subjects, tmp_path, mode, train_subject_a
):
    config = tiny_train_config(mode=mode, learning_rate=1e-2 if mode == "lora" else 1e-3)
    result = train_subject_a(sdxl_model, two_subjects, config, tmp_path / "out")
    assert result.mode == mode and [s for s, _ in result.losses] == [2, 4]
    assert all(np.isfinite(v) for _, v in result.losses)
    tuned = models.load_pipeline(result.model_uri)
    assert type(tuned).__name__ == "StableDiffusionXLPipeline"
    base = models.load_pipeline(sdxl_model)
    # the fine-tuned UNet differs from the base (LoRA: the adapter is loaded and non-zero)
    x = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    embeds, added, _ = encode(base, ["a sks square"])
    with torch.no_grad():
        kwargs = dict(encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)
        before = base.unet(x, torch.tensor([500]), **kwargs)[0]
        after = tuned.unet(x, torch.tensor([500]), **kwargs)[0]
    assert (after - before).abs().max() > 1e-4
    if mode == "full":
        assert (Path(result.model_uri) / "tokenizer_2" / "vocab.json").is_file()
    else:
        weights = load_file(Path(result.model_uri) / models.LORA_WEIGHTS_NAME)
        assert weights and all(k.startswith("unet.") for k in weights)


def test_trainable_text_path_equals_the_pipelines_encoding(sdxl_model):
    """The differentiable two-encoder path (used when the text encoders train) gives what encode_prompt gives."""
    pipe = models.load_pipeline(sdxl_model)
    cond = SDXL.encode_prompts(pipe, ["a sks dog", "a dog"], torch.device("cpu"), RES)
    with torch.no_grad():
        trained_embeds, trained_added = SDXL.trainable_conditioning(SDXL.text_encoders(pipe), cond)
    torch.testing.assert_close(trained_embeds.float(), cond.embeds)
    torch.testing.assert_close(trained_added["text_embeds"].float(), cond.added["text_embeds"])
    torch.testing.assert_close(trained_added["time_ids"], cond.added["time_ids"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sdxl_text_encoders_train_and_are_exported(sdxl_model, two_subjects, tmp_path, mode, train_subject_a):
    config = tiny_train_config(
        mode=mode, train_text_encoder=True, learning_rate=1e-2 if mode == "lora" else 1e-3
    )
    result = train_subject_a(sdxl_model, two_subjects, config, tmp_path / "out")
    assert all(np.isfinite(v) for _, v in result.losses)
    base, tuned = models.load_pipeline(sdxl_model), models.load_pipeline(result.model_uri)
    _, _, ids = encode(base, ["a sks square"])
    with torch.no_grad():
        for name, tokens in ids.items():
            before = getattr(base, name)(tokens, output_hidden_states=True).hidden_states[-2]
            after = getattr(tuned, name)(tokens, output_hidden_states=True).hidden_states[-2]
            assert (after - before).abs().max() > 1e-5, f"{name} did not change"
    if mode == "lora":
        keys = load_file(Path(result.model_uri) / models.LORA_WEIGHTS_NAME).keys()
        assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}


def test_packed_sdxl_subjects_equal_their_single_runs(
    sdxl_model, two_subjects, tmp_path, packed_equals_single
):
    config = tiny_train_config(mode="lora", steps=4, learning_rate=1e-2, lora_rank=2, max_grad_norm=0.05)
    packed_equals_single(sdxl_model, config, two_subjects, tmp_path)


def test_sdxl_runs_end_to_end(sdxl_model, tmp_path):
    """`dreambooth run` on an SDXL base: ingest, identifier, prior, LoRA training, evaluation, registration."""
    photos = make_subject_images(tmp_path / "photos", n=3, size=64)
    config = RunConfig(
        base_model=sdxl_model,
        subject=Subject(name="red-square", class_noun="square", images=str(photos)),
        run_dir=str(tmp_path / "run"),
        ingest=IngestConfig(resolution=RES, min_side=32),
        identifier=IdentifierConfig(),
        prior=PriorConfig(num_images=2, steps=2, batch_size=2, device="cpu"),
        train=tiny_train_config(mode="lora", steps=2, learning_rate=1e-2),
        eval=EvalConfig(
            **dict(max_prompts=1, images_per_prompt=2, pres_images=2, steps=2, batch_size=2, device="cpu"),
            dino_model=str(evaluators.build_tiny_dino(tmp_path / "dino")),
            clip_model=str(evaluators.build_tiny_clip(tmp_path / "clip")),
        ),  # fmt: skip
        registry={"uri": str(tmp_path / "registry")},
        samples_per_prompt=0,
    )
    result = personalize.run(config)
    assert result.registered is not None and result.registered["version"] == 1
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["dino"] is not None and metrics["metrics"]["clip_t"] is not None
    pipe = models.load_pipeline(result.registered["model_uri"])
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_denoiser_size_is_read_from_the_safetensors_headers(sdxl_model, tiny_model):
    for uri in (sdxl_model, tiny_model):
        unet = models.load_pipeline(uri).unet
        assert models.denoiser_parameter_count(uri) == sum(p.numel() for p in unet.parameters())


def test_pack_size_shrinks_with_the_unet(monkeypatch, sdxl_model):
    """On an 80 GiB GPU: SD-1.5-sized UNets pack 16 (the cap) at 512 px; one 3x larger (SDXL) packs fewer."""
    monkeypatch.setattr(models, "resolve_device", lambda device="auto": "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    sd15 = packed.default_pack_size("cuda", 512)
    monkeypatch.setattr(
        models, "denoiser_parameter_count", lambda uri, allow_pickle=False: 3 * models.SD15_UNET_PARAMETERS
    )
    sdxl = packed.default_pack_size("cuda", 512, base_model=sdxl_model)
    # (0.9 * 80 - 6 * 3) GiB / (4 * 3) GiB per subject = 4
    assert (sd15, sdxl) == (16, 4)
    assert (
        packed.default_pack_size("cuda", 1024, base_model=sdxl_model) == 1
    )  # 48 GiB per subject: one at a time
