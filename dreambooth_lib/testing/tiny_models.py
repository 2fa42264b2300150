"""Tiny pipelines of every family (SD, SDXL, SD3, FLUX.1) built from configs: random weights, the real CLIP
vocabulary, for T5 a small tokenizer built offline. The models of the tests and the demo, saved and loaded through
the same code as real ones; no hub is needed."""

from __future__ import annotations

import shutil
from pathlib import Path

from dreambooth_lib import storage
from dreambooth_lib.models.families import StableDiffusion, StableDiffusionXL
from dreambooth_lib.models.tokenizer import clip_bpe_vocab_and_merges, write_clip_tokenizer


def _tiny_vae(seed: int, sample_size: int, **overrides):
    """The tiny 2-level VAE of diffusers' test components (downsampling x2)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    return AutoencoderKL(**{**config, **overrides})


def _tiny_text_config():
    """A 5-layer, 32-wide CLIP text encoder config over the real CLIP vocabulary."""
    from transformers import CLIPTextConfig

    vocab, _ = clip_bpe_vocab_and_merges()
    return CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        projection_dim=32,
    )


def _tiny_clips(out: Path, seed: int, *encoder_classes):
    """One tiny CLIP text encoder per class (seeded seed, seed + 1, ...) and the real-vocabulary tokenizer, written
    to a build folder `_save_tiny` copies its slow-tokenizer files from: (encoders, tokenizer, that folder)."""
    import torch
    from transformers import CLIPTokenizer

    encoders = []
    for i, encoder_class in enumerate(encoder_classes):
        torch.manual_seed(seed + i)
        encoders.append(encoder_class(_tiny_text_config()))
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    return encoders, CLIPTokenizer.from_pretrained(str(tok_dir)), tok_dir


def _save_tiny(pipe, out: Path, tok_dir: Path, tokenizer_folders: tuple[str, ...]) -> Path:
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # slow-tokenizer files too, for transformers 4 readers
        for folder in tokenizer_folders:
            shutil.copyfile(tok_dir / name, out / folder / name)
    storage.delete_prefix(str(tok_dir))
    return out


def _tiny_unet(sample_size: int, **family_settings):
    """The 2-level UNet with cross-attention of diffusers' test components; `family_settings` add SDXL's
    conditioning (or set SD's attention)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **family_settings,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny SD-1.x-shaped pipeline (random weights, real CLIP vocabulary) of a few MB, deterministic in seed.

    Shapes follow diffusers' own test components (`get_dummy_components`): a 2-level UNet with cross-attention,
    a 2-level VAE (downsampling x2, so 64 px images make 32 px latents), and a 5-layer CLIP text encoder.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = _tiny_unet(sample_size, cross_attention_dim=32, attention_head_dim=8)
    vae = _tiny_vae(seed + 1, sample_size)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    return _save_tiny(
        StableDiffusion.pipeline_from_parts(unet, vae, text_encoder, tokenizer), out, tok_dir, ("tokenizer",)
    )


def build_tiny_sdxl_model(out_dir: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny SDXL-shaped pipeline (random weights, the real CLIP vocabulary in both tokenizers), a few MB.

    Shapes follow diffusers' SDXL test components: a UNet with `addition_embed_type="text_time"` (pooled text
    embeddings + 6 size/crop ids), cross-attention over both encoders' hidden states concatenated (32 + 32), a
    CLIPTextModel and a CLIPTextModelWithProjection.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = _tiny_unet(
        sample_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids × 8 + the pooled text embedding
        cross_attention_dim=64,
    )
    vae = _tiny_vae(seed + 1, sample_size, scaling_factor=0.13025)  # SDXL's VAE scale
    (text_encoder, text_encoder_2), tokenizer, tok_dir = _tiny_clips(
        out, seed + 2, CLIPTextModel, CLIPTextModelWithProjection
    )
    pipe = StableDiffusionXL.pipeline_from_parts(
        unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer
    )
    return _save_tiny(pipe, out, tok_dir, ("tokenizer", "tokenizer_2"))


# --- flow-matching families: a T5 encoder needs a tokenizer, built here offline ------------------------------------

# Words a tiny T5 tokenizer keeps whole, besides those of the paper's prompt lists: what tests and the demo say.
EXTRA_T5_WORDS = (
    "a an photo of the dog cat square circle star backpack red green blue yellow purple background"
)


def tiny_t5_vocabulary() -> list[tuple[str, float]]:
    """A word-level Unigram vocabulary, deterministic (a trained Unigram is not, run to run, which would change
    every content digest): the specials T5 expects at ids 0-2, every word of the paper's prompt lists and a few
    more as whole pieces, and single characters so that any text (an identifier such as "sks") still tokenizes,
    piece by piece. Words score above characters, so a known word is one piece."""
    import json
    import re
    import string
    from importlib import resources

    prompts = resources.files("dreambooth_lib").joinpath("assets/prompts.json").read_text()
    templates = json.loads(prompts)
    text = " ".join(templates["object_prompts"] + templates["live_subject_prompts"]) + " " + EXTRA_T5_WORDS
    words = sorted(set(re.findall(r"[a-z]+", text.lower())))
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in words]
    seen = {p for p, _ in pieces}
    pieces += [(p, -8.0) for p in ["▁", *("▁" + c for c in chars)] if p not in seen]
    pieces += [(c, -10.0) for c in chars]
    return pieces


def write_tiny_t5_tokenizer(out_dir: str | Path):
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=tiny_t5_vocabulary(), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(out_dir))
    return T5Tokenizer.from_pretrained(str(out_dir))


def _tiny_t5(vocab_size: int, d_model: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            is_encoder_decoder=False,
            use_cache=False,
        )  # fmt: skip
    )


def _tiny_flow_vae(seed: int, shift_factor: float, scaling_factor: float):
    """The tiny VAE with 16 latent channels and no quant convs, as FLUX.1's and SD3's VAEs (x2 downsampling)."""
    return _tiny_vae(
        seed, 32, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )  # fmt: skip


def build_tiny_flux_model(out_dir: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny FLUX.1-shaped pipeline (dev with guidance_embeds, else schnell): a 1+1-block transformer over
    2x2-packed 16-channel latents, CLIP (real vocabulary) for the pooled embedding, a tiny T5 with an offline
    tokenizer for the sequence, and FLUX.1's scheduler (dev: dynamic shifting). A few MB."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )  # fmt: skip
    vae = _tiny_flow_vae(seed + 1, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE constants
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    t5_tokenizer = write_tiny_t5_tokenizer(out / "_t5_tokenizer_build")
    text_encoder_2 = _tiny_t5(len(t5_tokenizer), d_model=32, seed=seed + 3)
    if guidance_embeds:  # dev
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
    else:  # schnell
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)), text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer, transformer=transformer,
    )  # fmt: skip
    storage.delete_prefix(str(out / "_t5_tokenizer_build"))
    return _save_tiny(pipe, out, tok_dir, ("tokenizer",))


def build_tiny_sd3_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD3-shaped pipeline: a 2-block MMDiT (the first with SD3.5's dual attention), CLIP-L and
    CLIP-G (real vocabulary, with projections) and a tiny T5 (offline tokenizer), SD3's shifted scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    vae = _tiny_flow_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE constants
    (text_encoder, text_encoder_2), tokenizer, tok_dir = _tiny_clips(
        out, seed + 2, CLIPTextModelWithProjection, CLIPTextModelWithProjection
    )
    t5_tokenizer = write_tiny_t5_tokenizer(out / "_t5_tokenizer_build")
    text_encoder_3 = _tiny_t5(
        len(t5_tokenizer), d_model=64, seed=seed + 4
    )  # T5's width: the joint attention's
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )  # fmt: skip
    storage.delete_prefix(str(out / "_t5_tokenizer_build"))
    return _save_tiny(pipe, out, tok_dir, ("tokenizer", "tokenizer_2"))


TINY_BUILDERS = {
    "sd": build_tiny_model,
    "sdxl": build_tiny_sdxl_model,
    "sd3": build_tiny_sd3_model,
    "flux": build_tiny_flux_model,
}


def tiny_train_config(**overrides):
    """A TrainConfig sized for the tiny models on a CPU (4 steps at 32 px: 16x16 latents, a step in ~0.05 s);
    `overrides` set any other field."""
    from dreambooth_lib.config import TrainConfig

    base = dict(steps=4, resolution=32, learning_rate=1e-3, checkpoint_every=0, log_every=2, device="cpu")
    return TrainConfig(**{**base, **overrides})
