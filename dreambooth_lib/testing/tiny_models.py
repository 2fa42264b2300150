"""Tiny Stable Diffusion and SDXL pipelines built from configs (random weights, the real CLIP vocabulary): the
models of the tests and the demo, saved and loaded through the same code as real ones. No hub is needed."""

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
    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
        **overrides,
    )


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


def _save_tiny(pipe, out: Path, tok_dir: Path, tokenizer_folders: tuple[str, ...]) -> Path:
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # slow-tokenizer files too, for transformers 4 readers
        for folder in tokenizer_folders:
            shutil.copyfile(tok_dir / name, out / folder / name)
    storage.delete_prefix(str(tok_dir))
    return out


def build_tiny_model(out_dir: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny SD-1.x-shaped pipeline (random weights, real CLIP vocabulary) of a few MB, deterministic in seed.

    Shapes follow diffusers' own test components (`get_dummy_components`): a 2-level UNet with cross-attention,
    a 2-level VAE (downsampling x2, so 64 px images make 32 px latents), and a 5-layer CLIP text encoder.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
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
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids × 8 + the pooled text embedding
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = _tiny_vae(seed + 1, sample_size, scaling_factor=0.13025)  # SDXL's VAE scale
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config())
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = StableDiffusionXL.pipeline_from_parts(
        unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer
    )
    return _save_tiny(pipe, out, tok_dir, ("tokenizer", "tokenizer_2"))
