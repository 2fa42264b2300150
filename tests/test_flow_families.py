"""Flow-matching base models (SD3, FLUX.1) through the family seam: the same loop, loss (Eq. 2), LoRA export,
packing and resume as SD, on tiny models built offline (random weights, the real CLIP vocabulary, a small T5 with a
deterministic tokenizer).

What must hold: training hands the transformer exactly what the pipeline hands it when sampling (the T5 sequence,
CLIP's pooled embedding, FLUX's packed latents, ids, t/1000 and guidance); the flow-matching objective is x_t =
(1-σ)x0 + σε with target ε - x0; what training exports loads in the family's diffusers pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import identifier, models, prior, storage, train
from dreambooth_lib.config import IdentifierConfig, PriorConfig, TrainConfig, parse_config
from dreambooth_lib.errors import ConfigError
from dreambooth_lib.models.families import Flux
from dreambooth_lib.models.families.flow_matching import FlowMatchingSchedule, loss_weights, timestep_density
from dreambooth_lib.models.families.flux import latent_image_ids, pack_latents, unpack_latents
from dreambooth_lib.testing import tiny_models
from dreambooth_lib.testing.tiny_models import tiny_train_config
from dreambooth_lib.train.subjects import subject_images
from dreambooth_lib.train.trainer import setup_trainer

RES = 32


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory) -> str:
    return str(tiny_models.build_tiny_flux_model(tmp_path_factory.mktemp("tiny-flux") / "model"))


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> str:
    return str(tiny_models.build_tiny_sd3_model(tmp_path_factory.mktemp("tiny-sd3") / "model"))


@pytest.fixture(params=["flux", "sd3"])
def flow_model(request) -> str:
    return request.getfixturevalue(f"{request.param}_model")


def _sample(pipe, prompt: str) -> torch.Tensor:
    out = pipe([prompt], num_inference_steps=2, height=RES, width=RES, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return torch.from_numpy(out.images[0])


# --- the tiny models --------------------------------------------------------------------------------------------


def test_tiny_models_load_as_their_pipelines(flux_model, sd3_model, tmp_path):
    flux, sd3 = models.load_pipeline(flux_model), models.load_pipeline(sd3_model)
    assert (type(flux).__name__, models.family_of(flux).name) == ("FluxPipeline", "flux")
    assert (type(sd3).__name__, models.family_of(sd3).name) == ("StableDiffusion3Pipeline", "sd3")
    assert flux.transformer.config.guidance_embeds  # dev
    schnell = models.load_pipeline(
        str(tiny_models.build_tiny_flux_model(tmp_path / "s", guidance_embeds=False))
    )
    assert not schnell.transformer.config.guidance_embeds
    assert models.family_of_model(flux_model).name == "flux"  # from model_index.json, no weights loaded


def test_schnell_trains_without_a_guidance_input(two_subjects, tmp_path, train_subject_a):
    """FLUX.1-schnell has no guidance embedding: training passes none (the transformer refuses one)."""
    schnell = str(tiny_models.build_tiny_flux_model(tmp_path / "schnell", guidance_embeds=False))
    result = train_subject_a(schnell, two_subjects, tiny_train_config(mode="lora", steps=2), tmp_path / "o")
    assert result.family == "flux" and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)


def test_the_t5_tokenizer_is_built_the_same_every_time(tmp_path):
    """A trained Unigram vocabulary changes run to run; ours must not, or every content digest would."""
    assert tiny_models.tiny_t5_vocabulary() == tiny_models.tiny_t5_vocabulary()
    a = tiny_models.build_tiny_flux_model(tmp_path / "a")
    b = tiny_models.build_tiny_flux_model(tmp_path / "b")
    assert models.model_digest(str(a)) == models.model_digest(str(b))
    t5 = identifier.piece_tokenizers(str(a))["tokenizer_2"]
    assert t5.tokenize("a photo of a dog") == ["▁a", "▁photo", "▁of", "▁a", "▁dog"]  # words are whole pieces
    assert t5.tokenize("sks") == ["▁s", "k", "s"]  # anything else still tokenizes, piece by piece


# --- conditioning: what the pipeline hands its transformer -----------------------------------------------------


def _captured_transformer_kwargs(pipe, prompt: str) -> dict:
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("kwargs", kwargs)

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    # guidance 1: no classifier-free doubling of the batch (SD3); FLUX's guidance is an input, not a doubling
    pipe([prompt], num_inference_steps=1, guidance_scale=1.0, height=RES, width=RES, output_type="latent")
    handle.remove()
    return seen["kwargs"]


def test_training_conditions_the_transformer_as_the_pipeline_does(flow_model):
    pipe = models.load_pipeline(flow_model)
    family = models.family_of(pipe)
    cond = family.encode_prompts(pipe, ["a sks dog"], torch.device("cpu"), RES)
    seen = _captured_transformer_kwargs(pipe, "a sks dog")
    torch.testing.assert_close(cond.embeds, seen["encoder_hidden_states"].float())
    torch.testing.assert_close(cond.added["pooled_projections"], seen["pooled_projections"].float())
    if family.name == "flux":  # the packed image's positions and the (zero) text positions, as sampling
        lat = RES // pipe.vae_scale_factor
        torch.testing.assert_close(latent_image_ids(lat, lat, "cpu", torch.float32), seen["img_ids"])
        assert not seen["txt_ids"].any() and seen["txt_ids"].shape == (cond.embeds.shape[1], 3)


def test_the_trainable_text_path_equals_the_pipelines_encoding(flow_model):
    """Training CLIP (T5 stays frozen) goes through a differentiable path that must give encode_prompt."""
    pipe = models.load_pipeline(flow_model)
    family = models.family_of(pipe)
    cond = family.encode_prompts(pipe, ["a sks dog", "a dog"], torch.device("cpu"), RES)
    trainable = family.trainable_text_encoders(pipe)
    assert "text_encoder_2" not in trainable if family.name == "flux" else set(trainable) == {
        "text_encoder", "text_encoder_2"
    }  # fmt: skip
    with torch.no_grad():
        embeds, added = family.trainable_conditioning(trainable, cond)
    torch.testing.assert_close(embeds.float(), cond.embeds)
    torch.testing.assert_close(added["pooled_projections"].float(), cond.added["pooled_projections"])


# --- the flow-matching objective ----------------------------------------------------------------------------------


def test_noising_and_target_are_the_straight_flow():
    schedule = FlowMatchingSchedule(torch.linspace(1000, 1, 1000), "none", 0.0, 1.0, 1.29)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([1000.0, 500.0, 1.0])
    noisy, target, weights = Flux().noised(schedule, x0, eps, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(target, eps - x0)
    assert weights is None  # "none": every row counts the same
    s = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(loss_weights("sigma_sqrt", s), 1 / s**2)
    torch.testing.assert_close(loss_weights("cosmap", s), 2 / (torch.pi * (1 - 2 * s + 2 * s**2)))


def test_the_timestep_density_draws_from_the_training_generator():
    schedule = FlowMatchingSchedule(torch.linspace(1000, 1, 1000), "logit_normal", 0.0, 1.0, 1.29)
    draw = lambda seed: timestep_density(schedule, 4096, torch.Generator().manual_seed(seed), "cpu")  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    u = draw(0)
    # sigmoid of a standard normal: in (0, 1), symmetric around 1/2, most mass in the middle
    assert (
        0 < u.min()
        and u.max() < 1
        and abs(u.mean() - 0.5) < 0.02
        and ((u - 0.5).abs() < 0.25).float().mean() > 0.6
    )


def test_flux_packing_is_the_pipelines_and_round_trips():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    tokens = pack_latents(latents)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(tokens, 8, 6), latents)


def test_a_ddpm_family_refuses_a_flow_weighting(tiny_model, two_subjects, tmp_path):
    with pytest.raises(ConfigError, match="weighting_scheme 'logit_normal' weights the timesteps of flow"):
        train.run(tiny_model, str(two_subjects / "a"), str(two_subjects / "prior"), "sks", "square",
                  tiny_train_config(weighting_scheme="logit_normal"), str(tmp_path / "out"))  # fmt: skip


# --- training and what it exports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_the_exported_lora_loads_in_the_familys_pipeline_and_changes_it(
    flow_model, two_subjects, tmp_path, train_text_encoder, train_subject_a
):
    config = tiny_train_config(mode="lora", learning_rate=1e-2, train_text_encoder=train_text_encoder)
    result = train_subject_a(flow_model, two_subjects, config, tmp_path / "o")
    family = models.family_of(models.load_pipeline(flow_model))
    assert result.family == family.name and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    keys = load_file(Path(result.model_uri) / models.LORA_WEIGHTS_NAME).keys()
    trained = {"transformer"} | (set(family.trainable_text_encoder_names) if train_text_encoder else set())
    assert {k.split(".")[0] for k in keys} == trained  # T5 never: it stays frozen
    if family.name == "flux":  # the feed-forward paths of the double-stream blocks are adapted too
        assert any(".ff.net.0.proj." in k for k in keys) and any(".ff_context.net.2." in k for k in keys)
    tuned, base = models.load_pipeline(result.model_uri), models.load_pipeline(flow_model)
    assert type(tuned).__name__ == family.pipeline_class
    assert (_sample(tuned, "a sks square") - _sample(base, "a sks square")).abs().max() > 1e-4


def test_a_full_fine_tune_writes_a_pipeline_that_loads(flux_model, two_subjects, tmp_path):
    result = train.run(flux_model, str(two_subjects / "a"), str(two_subjects / "prior"), "sks", "square",
                       tiny_train_config(mode="full"), str(tmp_path / "o"))  # fmt: skip
    tuned = models.load_pipeline(result.model_uri)
    assert type(tuned).__name__ == "FluxPipeline"
    base = load_file(Path(flux_model) / "transformer" / "diffusion_pytorch_model.safetensors")
    after = tuned.transformer.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in base.items())


def test_a_preempted_flux_run_resumes_bit_identically(flux_model, two_subjects, tmp_path, preempted_at):
    config = tiny_train_config(mode="lora", steps=6, checkpoint_every=2, log_every=1, learning_rate=1e-2)
    args = (flux_model, str(two_subjects / "a"), str(two_subjects / "prior"), "sks", "square", config)
    reference = train.run(*args, str(tmp_path / "ref"))
    preempted_at(5, train.run, *args, str(tmp_path / "run"))
    resumed = train.run(*args, str(tmp_path / "run"), resume=True)
    assert resumed.resumed_from == 4 and resumed.losses == reference.losses
    got = load_file(Path(resumed.model_uri) / models.LORA_WEIGHTS_NAME)
    want = load_file(Path(reference.model_uri) / models.LORA_WEIGHTS_NAME)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_packed_flux_subjects_equal_their_single_runs(
    flux_model, two_subjects, tmp_path, packed_equals_single
):
    config = tiny_train_config(mode="lora", steps=4, learning_rate=1e-2, lora_rank=2, max_grad_norm=0.05)
    packed_equals_single(flux_model, config, two_subjects, tmp_path)


# --- the other steps on a flow model ------------------------------------------------------------------------------


def test_the_identifier_is_rare_for_t5_too(flux_model):
    result = identifier.run(flux_model, "dog", IdentifierConfig())
    assert result.also_rare_in == ["tokenizer_2"]
    t5 = identifier.piece_tokenizers(flux_model)["tokenizer_2"]
    assert identifier.is_rare_in_pieces(t5, result.identifier)
    with pytest.raises(ConfigError, match="is a word .* for the model's tokenizer_2"):
        identifier.run(flux_model, "dog", IdentifierConfig(identifier="dog"))


def test_the_prior_set_is_sampled_with_the_flow_and_keyed_by_family(flux_model, sd3_model, tmp_path):
    config = PriorConfig(num_images=2, steps=2, batch_size=2, device="cpu", sampler="dpm++")
    flux_set = prior.run(flux_model, "dog", config, str(tmp_path / "priors"), resolution=RES)
    assert flux_set.sampler == "flow-euler"  # what sampled it, whatever the config named
    record = storage.read_json(storage.join(flux_set.uri, "prior_set.json"))
    assert (record["family"], record["sampler"]) == ("flux", "flow-euler")
    sd3_set = prior.run(sd3_model, "dog", config, str(tmp_path / "priors"), resolution=RES)
    assert sd3_set.key != flux_set.key and len(sd3_set.images) == 2


# --- memory: a frozen base in less precision ----------------------------------------------------------------------


def test_a_bf16_frozen_base_trains_fp32_adapters(flux_model, two_subjects, tmp_path, train_subject_a):
    config = tiny_train_config(mode="lora", learning_rate=1e-2, base_precision="bf16", mixed_precision="bf16")
    subject = train.TrainSubject(instance_dir=str(two_subjects / "a"), prior_dir=str(two_subjects / "prior"), identifier="sks",
                                 class_noun="square", out="unused")  # fmt: skip
    images = [subject_images(subject, config)]
    t = setup_trainer(models.load_pipeline(flux_model), [subject], images, config, "cpu")
    frozen = {p.dtype for p in t.denoiser.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in t.params} == {torch.float32}
    result = train_subject_a(flux_model, two_subjects, config, tmp_path / "o")
    weights = load_file(Path(result.model_uri) / models.LORA_WEIGHTS_NAME)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "full", "base_precision": "bf16"}, "mode full trains every weight"),
        ({"base_precision": "bf16"}, "trains under bf16 autocast only"),  # fp32 on a CPU: no autocast
        ({"base_precision": "nf4", "mixed_precision": "bf16"}, "bitsandbytes, which runs on CUDA only"),
        ({"base_precision": "fp8", "mixed_precision": "bf16"}, "torchao, which runs on CUDA only"),
    ],
)
def test_a_frozen_base_precision_this_machine_cannot_train_with_is_refused(
    flux_model, two_subjects, tmp_path, settings, message
):
    settings = {
        "steps": 2,
        "resolution": RES,
        "device": "cpu",
        "mode": "lora",
        "prior_loss_weight": 0,
        **settings,
    }
    with pytest.raises(ConfigError, match=message):
        config = parse_config(TrainConfig, settings, "train")
        train.run(flux_model, str(two_subjects / "a"), None, "sks", "square", config, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before any work


# --- the preset and the CLI -----------------------------------------------------------------------------------------


def test_the_flux_preset_runs_end_to_end_on_the_tiny_model(tiny_evaluators, subject_dir, tmp_path):
    """`dreambooth run --config configs/flux_lora.yaml` with the tiny model's overrides: every step, on CPU."""
    import json

    from typer.testing import CliRunner

    from dreambooth_lib.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["tiny-model", str(tmp_path / "tiny"), "--family", "flux", "--json"])
    assert made.exit_code == 0 and json.loads(made.stdout)["family"] == "flux"
    overrides = {
        "base_model": str(tmp_path / "tiny"), "run_dir": str(tmp_path / "run"), "subject.images": str(subject_dir),
        "ingest.resolution": RES, "ingest.min_side": RES, "train.resolution": RES, "train.steps": 2,
        "train.checkpoint_every": 0, "train.device": "cpu", "train.base_precision": "fp32",
        "train.mixed_precision": "no", "train.gradient_checkpointing": False, "prior.num_images": 2,
        "prior.steps": 2, "prior.batch_size": 2, "prior.device": "cpu", "prior.root": str(tmp_path / "priors"),
        "eval.max_prompts": 1, "eval.images_per_prompt": 1, "eval.pres_images": 1, "eval.steps": 2,
        "eval.device": "cpu", "eval.dino_model": tiny_evaluators["dino"], "eval.clip_model": tiny_evaluators["clip"],
        "registry.uri": str(tmp_path / "registry"), "samples_per_prompt": 0,
    }  # fmt: skip
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    preset = Path(__file__).parents[1] / "configs" / "flux_lora.yaml"
    result = runner.invoke(app, ["run", "--config", str(preset), *sets, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["registered"]["version"] == 1 and record["metrics"]["dino"] is not None
    summary = json.loads((tmp_path / "run" / "train" / "train_summary.json").read_text())
    assert summary["family"] == "flux" and summary["config"]["guidance_scale"] == 3.5
    card = (tmp_path / "registry" / "dog-flux" / "1" / "model_card.md").read_text()
    assert "from diffusers import FluxPipeline" in card


# --- both pipelines through kfp.local on a tiny FLUX.1 ---------------------------------------------------------------


def test_both_pipelines_run_on_a_flux_base(flux_model, tmp_path_factory):
    """`personalize` (a full fine-tune, with the model-output prior) and `batch_personalize` (two subjects, LoRA
    packed into one training task) through kfp.local on a FLUX.1 base: every step takes the family from the model."""
    import json
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo)) if str(repo) not in sys.path else None
    from pipelines import demo

    out = tmp_path_factory.mktemp("flux-dags")
    paths = {**demo.build_models(out), "model": flux_model}
    demo.init_local(out / "kfp-root")
    subject = demo.make_subject(out / "subjects" / "red-square")
    single = demo.run_personalize(out, paths, subject, out / "registry",
                                  prior_options={"mode": "model_output"})  # fmt: skip
    summary = json.loads((Path(single["model"]) / "train_summary.json").read_text())
    assert summary["family"] == "flux" and summary["config"]["prior_mode"] == "model_output"
    assert summary["num_prior_images"] == 0 and {"dino", "clip_t", "pres"} <= set(single["metrics"])

    entries = [
        {"name": "red-square", "class_noun": "square", "images": str(subject)},
        {"name": "blue-square", "class_noun": "square",
         "images": str(demo.make_subject(out / "subjects" / "blue-square", color=(30, 60, 220), seed=1))},
    ]  # fmt: skip
    batch = demo.run_batch(out, paths, entries, out / "batch-registry")
    assert {name: s["status"] for name, s in batch["subjects"].items()} == {
        "red-square": "registered", "blue-square": "registered"
    }, batch  # fmt: skip
    packed_record = json.loads(next((out / "batches").glob("*/packed.json")).read_text())
    assert [s["packed"] for s in packed_record["subjects"]] == [True, True]  # one task trained both
