"""Train the toy world's text-to-image model from scratch on one CPU thread and write a diffusers folder that
`StableDiffusionPipeline.from_pretrained` loads, with the toy evaluators beside it.

    python -m dreambooth_lib.testing.toyworld.train --out toyworld-out        # the shipped model (make toyworld)
    python -m dreambooth_lib.testing.toyworld.train --out /tmp/tw --unet-steps 300   # a quick look

Stages, each seeded from `seed`: (1) an AutoencoderKL (x2 downsampling, 4 latent channels) on world images, its
scaling factor set so latents have unit variance, as SD's 0.18215 does; (2) a CLIP text encoder (the real CLIP
vocabulary) and a UNet2DConditionModel trained together on cached latents, SD's noise schedule and epsilon
target, captions dropped to "" 10 % of the time so classifier-free guidance works, an EMA of both kept and
shipped; (3) the toy evaluators (probe.py, evaluators.py); (4) the probe's accuracy on samples of every caption.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth_lib.testing.toyworld import world


@dataclass
class ToyTrainConfig:
    seed: int = 0
    num_images: int = 24000  # the cached training set (48 captions x ~500 placements)
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 2e-3
    decoder_steps: int = (
        2000  # the decoder refined on posterior means, the encoder (the UNet's latents) frozen
    )
    decoder_lr: float = 1e-3
    unet_steps: int = 2600
    batch: int = 64
    lr: float = 1.5e-3
    warmup: int = 200
    caption_dropout: float = 0.1  # classifier-free guidance
    # then more steps from the EMA weights with offset noise (a per-image, per-channel constant added to the noise,
    # Crosslabs 2023): without it the model could not move an image's mean away from the average, and drew every
    # background grey (background followed in 39 % of samples, chance 33 %, measured)
    offset_noise_steps: int = 1600
    # 0.4: about 6x the noise's own per-channel mean over 16x16 latents (1/16), as 0.1 is over SD's 64x64
    offset_noise: float = 0.4
    offset_noise_lr: float = 3e-4
    ema_decay: float = 0.999
    text_hidden: int = 32
    text_layers: int = 4
    unet_channels: tuple[int, int, int] = (32, 64, 64)
    probe_steps: int = 1500  # the ViT DINO stand-in
    conv_probe_steps: int = 4000  # the CNN probe: shape comes slowly (66 % held out after 1,500 steps)
    clip_steps: int = 1500
    eval_samples_per_caption: int = 4
    threads: int = 1  # torch's intra-op threads (2 ran the UNet stage ~1.6x faster on 2 cores)


# --- models --------------------------------------------------------------------------------------------------


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.SIZE,
    )


def build_text_encoder(cfg: ToyTrainConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_lib.models import clip_bpe_vocab_and_merges

    vocab, _ = clip_bpe_vocab_and_merges()
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            vocab_size=len(vocab),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 2,
            num_attention_heads=4,
            num_hidden_layers=cfg.text_layers,
            max_position_embeddings=77,
            projection_dim=cfg.text_hidden,
        )
    )


def build_unet(cfg: ToyTrainConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        # no attention at the 16x16 level: self-attention over 256 positions tripled the step time (measured)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8,
    )


def tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from dreambooth_lib.models import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp) / "tok")))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- stage 1: the VAE ----------------------------------------------------------------------------------------


def _fit_reconstruction(params, images: np.ndarray, steps: int, lr: float, batch: int, seed: int, reconstruct,
                        log, name: str) -> float:  # fmt: skip
    """AdamW with a cosine schedule on `reconstruct(x) -> (loss, reconstruction)` over random batches of `images`;
    returns the last batch's MSE."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    x_all = to_tensor(images)
    for step in range(steps):
        x = x_all[rng.integers(len(x_all), size=batch)]
        loss, recon = reconstruct(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} {step} mse {F.mse_loss(recon, x).item():.5f}")
    return F.mse_loss(recon, x).item()


def train_vae(images: np.ndarray, cfg: ToyTrainConfig, log) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    vae = build_vae()

    def reconstruct(x):
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # a tiny KL weight: the latents stay near a unit Gaussian's scale without blurring the decoder
        return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean(), recon

    params = list(vae.parameters())
    _fit_reconstruction(
        params, images, cfg.vae_steps, cfg.vae_lr, cfg.vae_batch, cfg.seed + 1, reconstruct, log, "vae"
    )
    return vae.eval()


@torch.no_grad()
def narrow_posterior(vae) -> None:
    """Make the posterior a point at its mean (log-variance -20, std 5e-5), as SD's VAE nearly is. The UNet learns
    posterior means; a fine-tune that draws `latent_dist.sample()` would otherwise see latents ~0.5 std away from
    them (measured: posterior std 0.42 against a latent spread of 0.80) and learn noise (DreamBooth's loss stayed
    at 0.3 and the subject never appeared)."""
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0
    vae.quant_conv.bias[channels:] = -20.0


def refine_decoder(vae, images: np.ndarray, cfg: ToyTrainConfig, log) -> float:
    """Train the decoder alone on the posterior means, as SD's fine-tuned VAE decoders were (the encoder, and so
    the latents the UNet learns, unchanged). After stage 1 alone the decoder washed colours out (a yellow | blue
    star came back pale and grey-pink, measured); returns the final reconstruction MSE."""
    vae.requires_grad_(False)
    params = [p for m in (vae.post_quant_conv, vae.decoder) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.train()

    def reconstruct(x):
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x), recon

    mse = _fit_reconstruction(params, images, cfg.decoder_steps, cfg.decoder_lr, cfg.vae_batch * 2, cfg.seed + 9,
                              reconstruct, log, "decoder")  # fmt: skip
    vae.requires_grad_(False)
    return mse


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The posterior means of all images (unscaled)."""
    x_all = to_tensor(images)
    return torch.cat([vae.encode(x_all[i : i + batch]).latent_dist.mean for i in range(0, len(x_all), batch)])


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray) -> float:
    x = to_tensor(images[:256])
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / mse)


# --- stage 2: text encoder + UNet ----------------------------------------------------------------------------


def train_text_to_image(
    latents: torch.Tensor,
    captions: list[str],
    cfg: ToyTrainConfig,
    log,
    start=None,
    steps: int | None = None,
    lr: float | None = None,
    offset_noise: float = 0.0,
):
    """Text encoder and UNet trained together on scaled latents (from `start`'s (text encoder, UNet) when given,
    else from scratch); returns their EMA copies and the tokenizer."""
    from diffusers import DDPMScheduler

    from dreambooth_lib.models.families.sd import SD_TRAINING_SCHEDULE

    tok = tokenizer()
    torch.manual_seed(cfg.seed + 2 if start is None else cfg.seed + 10)
    steps, lr_max = steps or cfg.unet_steps, lr or cfg.lr
    text_encoder, unet = (build_text_encoder(cfg), build_unet(cfg)) if start is None else start
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    scheduler = DDPMScheduler(**SD_TRAINING_SCHEDULE, clip_sample=False)
    # the distinct captions (and "") are encoded once per step: the batch indexes into them
    vocabulary = sorted(set(captions)) + [""]
    ids = tok(
        vocabulary,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = ids.input_ids
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    empty = len(vocabulary) - 1
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr_max, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 3 if start is None else cfg.seed + 11)
    text_encoder.train()
    unet.train()
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        lr = lr_max * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        cap = caption_index[idx]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, empty), cap)
        used, inverse = torch.unique(cap, return_inverse=True)
        hidden = text_encoder(ids[used])[0][inverse]
        noise = torch.randn(x0.shape, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if start is None else cfg.ema_decay
        with torch.no_grad():
            for ema, model in ((ema_te, text_encoder), (ema_unet, unet)):
                for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == steps - 1:
            rate = (step + 1) * cfg.batch / (time.perf_counter() - t0)
            log(f"unet {step} loss {running:.4f} lr {lr:.2e} {rate:.0f} samples/s")
    return ema_te, ema_unet, tok


def save_pipeline(out: Path, unet, vae, text_encoder, tok, dtype=torch.float16) -> Path:
    """The diffusers folder, weights in `dtype` (fp16 ships: half the bytes; loaders upcast on CPU)."""
    import shutil
    import tempfile

    from dreambooth_lib.models import write_clip_tokenizer
    from dreambooth_lib.models.families import StableDiffusion

    pipe = StableDiffusion.pipeline_from_parts(unet, vae, text_encoder, tok)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_clip_tokenizer(Path(tmp) / "tok")
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tok_dir / name, out / "tokenizer" / name)
    pipe.to(dtype=torch.float32)
    return out


# --- the whole run -------------------------------------------------------------------------------------------


MODEL_STAGE_FILE = "model_stage.json"  # stages 1-2's record beside out/model: what --reuse-model starts from


def train_model(out: Path, images: np.ndarray, captions: list[str], cfg: ToyTrainConfig, log) -> dict:
    """Stages 1-2: the VAE, then text encoder and UNet; writes out/model and its record (returned)."""
    t = time.perf_counter()
    # the VAE also sees shapes in any colours, two-coloured ones too: a subject is drawn only if it can decode it
    vae_images = np.concatenate([images, world.any_color_images(len(images) // 2, cfg.seed + 8)])
    vae = train_vae(vae_images, cfg, log)
    latents = encode_latents(vae, images)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    narrow_posterior(vae)
    refine_decoder(vae, vae_images, cfg, log)
    psnr = vae_psnr(vae, images)
    timings = {"vae_s": time.perf_counter() - t}
    log(f"vae PSNR {psnr:.1f} dB, scaling_factor {scaling:.4f}")

    t = time.perf_counter()
    text_encoder, unet, tok = train_text_to_image(latents * scaling, captions, cfg, log)
    timings["text_to_image_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.offset_noise_steps:
        text_encoder, unet, tok = train_text_to_image(
            latents * scaling, captions, cfg, log, start=(text_encoder, unet), steps=cfg.offset_noise_steps,
            lr=cfg.offset_noise_lr, offset_noise=cfg.offset_noise,
        )  # fmt: skip
    timings["offset_noise_s"] = time.perf_counter() - t
    save_pipeline(out / "model", unet, vae, text_encoder, tok)
    record = {"vae_psnr_db": round(psnr, 2), "scaling_factor": scaling, "timings_s": timings}
    (out / MODEL_STAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run(out_dir: str | Path, cfg: ToyTrainConfig, reuse_model: bool = False) -> dict:
    """All four stages into `out_dir`; `reuse_model` starts from the model stages 1-2 already wrote there (the
    evaluators and the measurement are redone)."""
    from dreambooth_lib.testing.toyworld import evaluators, probe

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reuse_model = reuse_model and (out / MODEL_STAGE_FILE).exists()
    log_file = (out / "train.log").open("a" if reuse_model else "w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    timings: dict[str, float] = {}
    t = time.perf_counter()
    scenes = world.sample_world(cfg.num_images, cfg.seed)
    images = world.images_array(scenes)
    caption_rng = np.random.default_rng(cfg.seed + 7)
    captions = [world.partial_caption(s, caption_rng) for s in scenes]
    labels = np.asarray([s.labels for s in scenes])
    timings["world_s"] = time.perf_counter() - t

    model_dir = out / "model"
    if reuse_model:
        model_stage = json.loads((out / MODEL_STAGE_FILE).read_text())
        log(f"reusing {model_dir} (stages 1-2: {model_stage})")
    else:
        model_stage = train_model(out, images, captions, cfg, log)
    timings.update(model_stage["timings_s"])

    t = time.perf_counter()
    probe_dir = probe.train_probe(
        out / "evaluators" / "dino", images, labels, cfg.probe_steps, cfg.seed + 4, log, cfg.conv_probe_steps
    )
    timings["probe_s"] = time.perf_counter() - t
    t = time.perf_counter()
    full_captions = [s.caption for s in scenes]
    evaluators.train_clip(
        out / "evaluators" / "clip", images, full_captions, cfg.clip_steps, cfg.seed + 5, log
    )
    timings["clip_s"] = time.perf_counter() - t

    t = time.perf_counter()
    accuracy = None
    if cfg.eval_samples_per_caption:
        accuracy = probe.prompt_following(
            model_dir, probe_dir, cfg.eval_samples_per_caption, seed=cfg.seed + 6
        )
        log(f"probe accuracy on samples: {accuracy}")
    timings["eval_s"] = time.perf_counter() - t
    record = {
        "config": asdict(cfg),
        "vae_psnr_db": model_stage["vae_psnr_db"],
        "scaling_factor": model_stage["scaling_factor"],
        "prompt_following": accuracy,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
        "cpu_time_s": round(time.process_time(), 1),
        "command": "python -m dreambooth_lib.testing.toyworld.train --out OUT --ship  (make toyworld)",
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log_file.close()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--ship", action="store_true", help="then replace dreambooth_lib/assets/toyworld with it"
    )
    parser.add_argument(
        "--reuse-model",
        action="store_true",
        help="keep the model an earlier run wrote to --out; redo the rest",
    )
    defaults = ToyTrainConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = ToyTrainConfig(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    print(json.dumps(run(args.out, cfg, args.reuse_model), indent=2))
    if args.ship:
        from dreambooth_lib.testing.toyworld import shipped

        print(f"shipped to {shipped.ship(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
