"""Training: Eq. 2's loss, cached latents, full and LoRA outputs (local and gs://), non-finite losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreambooth_lib import models, train
from dreambooth_lib.errors import ConfigError, TrainingError
from dreambooth_lib.models.families.sd import diffusion_target
from dreambooth_lib.testing.tiny_models import tiny_train_config
from dreambooth_lib.train import step, trainer
from dreambooth_lib.train.data import encode_images, list_png, load_image
from dreambooth_lib.train.loss import dreambooth_loss
from dreambooth_lib.train.speed import make_optimizer, speed_options

RES = 32  # 16x16 latents: a tiny-model step in ~0.05 s


# --- the loss ----------------------------------------------------------------------------------------------------


def test_loss_is_eq2_hand_computed():
    pred_inst, target_inst = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 4.0])
    pred_prior, target_prior = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 3.0, 1.0, 1.0])
    # MSE(subject) = (1 + 0 + 4 + 0) / 4 = 1.25; MSE(prior) = (1 + 4 + 0 + 0) / 4 = 1.25; λ = 0.5
    loss = dreambooth_loss(pred_inst, target_inst, pred_prior, target_prior, 0.5)
    assert loss.item() == pytest.approx(1.25 + 0.5 * 1.25)


def test_prior_term_is_absent_when_lambda_is_zero():
    nan = torch.full((4,), float("nan"))
    loss = dreambooth_loss(torch.ones(4), torch.zeros(4), nan, nan, 0.0)
    assert loss.item() == 1.0  # not NaN: the prior term is skipped, not multiplied by zero


def test_targets_follow_the_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(
        prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    a = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), a * noise - s * latents)
    with pytest.raises(TrainingError, match="prediction_type"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


# --- cached latents and the step -----------------------------------------------------------------------------------


def test_cached_latents_give_the_loss_of_encoding_every_step(tiny_model, train_data_dirs):
    pipe = models.load_pipeline(tiny_model)
    uris = list_png(train_data_dirs[0])
    cache = encode_images(pipe.vae, uris, RES, "cpu")
    pixels = torch.stack([load_image(u, RES) for u in uris])
    idx = torch.tensor([2, 0])
    cached = cache.sample(idx, torch.Generator().manual_seed(7))
    with torch.no_grad():
        per_step = pipe.vae.encode(pixels[idx]).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    per_step = per_step * pipe.vae.config.scaling_factor
    torch.testing.assert_close(cached, per_step, rtol=1e-5, atol=1e-5)

    noise, t = torch.randn(cached.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    embeds = pipe.text_encoder(
        pipe.tokenizer(["a sks square"] * 2, padding="max_length", return_tensors="pt").input_ids
    )[0]

    def loss(latents):
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            pred = pipe.unet(noisy, t, embeds).sample
        return dreambooth_loss(pred, diffusion_target(pipe.scheduler, latents, noise, t), None, None, 0.0)

    torch.testing.assert_close(loss(cached), loss(per_step), rtol=1e-5, atol=1e-6)


def test_lambda_zero_never_computes_the_prior_batch(tiny_model, train_data_dirs):
    images = [(list_png(train_data_dirs[0]), list_png(train_data_dirs[1]))]
    subject = train.TrainSubject(
        instance_dir=train_data_dirs[0],
        prior_dir=train_data_dirs[1],
        identifier="sks",
        class_noun="square",
        out="unused",
    )
    batch_sizes = []
    for config, rows in (
        (tiny_train_config(prior_loss_weight=0, batch_size=2), 2),
        (tiny_train_config(batch_size=2), 4),
    ):
        pipe = models.load_pipeline(tiny_model)
        t = trainer.setup_trainer(pipe, [subject], images, config, "cpu")
        # λ = 0: the prior images are not even encoded; else 2 subject + 2 prior rows in one forward
        assert (t.data[0].prior is None) == (config.prior_loss_weight == 0)
        batch_sizes.clear()
        t.denoiser.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
        step.train_step(t)
        assert batch_sizes == [rows]


def test_speed_options_are_resolved_in_one_place():
    cpu = speed_options(tiny_train_config(), "cpu")
    assert (cpu.autocast_dtype, cpu.fused_adam, cpu.grad_scaler, cpu.precision) == (
        None,
        False,
        False,
        "fp32",
    )
    assert speed_options(tiny_train_config(mixed_precision="bf16"), "cpu").precision == "bf16"
    assert speed_options(tiny_train_config(mixed_precision="fp16"), "cpu").grad_scaler


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    speed = speed_options(tiny_train_config(use_8bit_adam=True), "cpu")
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], tiny_train_config(), speed)


# --- run(): outputs -----------------------------------------------------------------------------------------------


def test_full_finetune_writes_a_loadable_diffusers_model(tiny_model, train_data_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "train"
    config = tiny_train_config(steps=5, train_text_encoder=True, text_encoder_learning_rate=1e-4)
    result = train.run(tiny_model, train_data_dirs[0], train_data_dirs[1], "sks", "square", config, str(out))

    assert [s for s, _ in result.losses] == [2, 4, 5] and result.final_loss == result.losses[-1][1]
    assert (result.num_instance_images, result.num_prior_images, result.precision) == (3, 4, "fp32")
    assert result.instance_prompt == "a sks square" and result.class_prompt == "a square"
    assert result.s_per_step > 0 and result.peak_memory_bytes > 0 and result.resumed_from is None
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["model_uri"] == str(out / "model") and summary["config"]["steps"] == 5
    marker = json.loads((out / "model" / "dreambooth_model.json").read_text())
    assert marker["identifier"] == "sks" and marker["base_model_digest"] == models.model_digest(tiny_model)
    assert not list((out / "model").rglob("*.bin"))

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"), use_safetensors=True)
    base = Path(tiny_model)
    trained_unet = load_file(out / "model/unet/diffusion_pytorch_model.safetensors")
    base_unet = load_file(base / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained_unet[k], base_unet[k]) for k in base_unet)
    trained_te = load_file(out / "model/text_encoder/model.safetensors")
    base_te = load_file(base / "text_encoder/model.safetensors")
    assert any(not torch.equal(trained_te[k], base_te[k]) for k in base_te)
    base_vae = load_file(base / "vae/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in base_vae.items())
    assert (out / "model/tokenizer/vocab.json").exists()


def test_lora_to_gcs_loads_through_models(tiny_model, train_data_dirs, gcs_bucket):
    from safetensors.torch import load_file

    from dreambooth_lib import storage

    out = f"{gcs_bucket}/runs/a/train"
    config = tiny_train_config(
        mode="lora",
        lora_rank=2,
        lora_alpha=4,
        prior_loss_weight=0,
        train_text_encoder=True,
        learning_rate=1e-2,
        checkpoint_every=2,
    )
    result = train.run(tiny_model, train_data_dirs[0], None, "sks", "square", config, out)

    assert result.model_uri == f"{out}/model" and result.num_prior_images == 0
    assert storage.read_json(f"{out}/train_summary.json")["mode"] == "lora"
    marker = storage.read_json(f"{out}/model/dreambooth_lora.json")
    assert marker == {
        "base_model": tiny_model,
        "base_model_digest": models.model_digest(tiny_model),
        "family": "sd",
        "identifier": "sks",
        "class_noun": "square",
        "rank": 2,
        "alpha": 4.0,
    }
    assert not storage.exists(result.checkpoint_dir)  # deleted once the model was published

    pipe = models.load_pipeline(result.model_uri)
    local = models.resolve_model_dir(result.model_uri)
    saved = load_file(local / models.LORA_WEIGHTS_NAME)
    for module, prefix in ((pipe.unet, "unet."), (pipe.text_encoder, "text_encoder.")):
        loaded_b = sum(v.abs().sum() for k, v in module.state_dict().items() if "lora_B" in k)
        saved_b = sum(
            v.abs().sum() for k, v in saved.items() if k.startswith(prefix) and (".up." in k or "lora_B" in k)
        )
        assert loaded_b > 0 and torch.allclose(
            loaded_b, saved_b
        )  # trained adapters (B starts at 0), all applied
        config_loaded = next(iter(module.peft_config.values()))
        assert (config_loaded.r, config_loaded.lora_alpha) == (2, 4)

    base = models.load_pipeline(tiny_model)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        ids = base.tokenizer(["a sks square"], padding="max_length", return_tensors="pt").input_ids
        assert not torch.allclose(
            pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample,
            base.unet(x, t, base.text_encoder(ids)[0]).sample,
        )


def test_non_finite_loss_stops_and_saves_no_model(tiny_model, train_data_dirs, tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = dreambooth_loss(*args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(step, "dreambooth_loss", poisoned)
    out = tmp_path / "train"
    with pytest.raises(TrainingError, match="non-finite .* at step 3"):
        train.run(
            tiny_model,
            train_data_dirs[0],
            train_data_dirs[1],
            "sks",
            "square",
            tiny_train_config(steps=6, log_every=5, checkpoint_every=4),
            str(out),
        )
    assert calls["n"] == 4  # stopped at the first read-back (checkpoint at step 4), not at the end
    assert not (out / "model").exists() and not (out / "train_summary.json").exists()
    assert not list((out / "checkpoints").glob("*/step-*"))  # no checkpoint holds poisoned weights


def test_missing_inputs_are_user_errors(tiny_model, train_data_dirs, tmp_path):
    with pytest.raises(ConfigError, match="no .png subject images"):
        train.run(tiny_model, str(tmp_path), None, "sks", "square", tiny_train_config(), str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="prior_loss_weight: 0"):
        train.run(
            tiny_model, train_data_dirs[0], None, "sks", "square", tiny_train_config(), str(tmp_path / "o")
        )


# --- the model-output prior ----------------------------------------------------------------------------------------


def test_the_model_output_prior_needs_no_images_and_starts_at_the_base(tiny_model, train_data_dirs, tmp_path):
    """No prior images: the prior term's target is the frozen base's prediction for the class prompt on the same
    noisy subject latents. A LoRA starts as the base (B = 0), so at step 1 that term is exactly 0, and the loss is
    the λ = 0 run's on the same draws (both draw only the subject rows)."""
    lora = dict(mode="lora", log_every=1, learning_rate=1e-2)
    with_base = train.run(tiny_model, train_data_dirs[0], None, "sks", "square",
                          tiny_train_config(**lora, prior_mode="model_output"), str(tmp_path / "mo"))  # fmt: skip
    without = train.run(tiny_model, train_data_dirs[0], None, "sks", "square",
                        tiny_train_config(**lora, prior_loss_weight=0), str(tmp_path / "off"))  # fmt: skip
    assert with_base.num_prior_images == 0 and with_base.config.prior_mode == "model_output"
    assert with_base.losses[0] == without.losses[0]
    assert with_base.losses[-1] != without.losses[-1]  # later the prior term pulls the class prompt back


def test_a_full_fine_tunes_model_output_targets_come_from_an_untouched_copy(tiny_model, train_data_dirs):
    config = tiny_train_config(mode="full", prior_mode="model_output", learning_rate=1e-2)
    subject = train.TrainSubject(instance_dir=train_data_dirs[0], prior_dir=None, identifier="sks", class_noun="square",
                                 out="unused")  # fmt: skip
    t = trainer.setup_trainer(
        models.load_pipeline(tiny_model), [subject], [(list_png(train_data_dirs[0]), [])], config, "cpu"
    )
    before = {k: v.clone() for k, v in t.frozen_denoiser.state_dict().items()}
    for _ in range(3):
        step.train_step(t)
    assert all(torch.equal(before[k], v) for k, v in t.frozen_denoiser.state_dict().items())
    assert any(
        not torch.equal(before[k], v) for k, v in t.denoiser.state_dict().items()
    )  # the trained one moved
