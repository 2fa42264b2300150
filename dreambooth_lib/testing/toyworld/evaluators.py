"""The toy world's evaluators, in the formats the evaluation loads (so it runs unchanged), labelled as toys:

- `dino/`: the probe classifier's ViT (probe.py) stands in for DINO;
- `clip/`: a small CLIPModel trained contrastively on world images and their captions stands in for CLIP, with
  the real CLIP tokenizer and an image-processor config for 32 px;
- `lpips.safetensors`: the LPIPS layout with random weights (as `dreambooth_lib.testing.evaluators` builds):
  DIV on the toy world compares random-conv features, a pixel-structure distance, not a learnt perceptual one.

Each carries an `evaluator.json` label saying what it is, which the report shows beside the metrics. Their
scores mean something only on toy-world images; they are not DINO, CLIP or LPIPS.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth_lib.testing.evaluators import build_tiny_lpips, label_evaluator
from dreambooth_lib.testing.toyworld import world


def _clip_model(seed: int):
    from transformers import CLIPConfig, CLIPModel

    from dreambooth_lib.models import clip_bpe_vocab_and_merges

    vocab, _ = clip_bpe_vocab_and_merges()
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": len(vocab),
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": world.SIZE,
            "patch_size": 4,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def train_clip(out_dir, images: np.ndarray, captions: list[str], steps: int, seed: int, log=print) -> Path:
    """Contrastive training on (image, caption) pairs; pairs that share a caption count as matches (the world has
    48 captions, so a batch of 64 holds duplicates)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from dreambooth_lib.evaluate.embedders import _clip_preprocess, preprocess_images
    from dreambooth_lib.models import write_clip_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(out)
    CLIPImageProcessor(
        size={"shortest_edge": world.SIZE}, crop_size={"height": world.SIZE, "width": world.SIZE}, resample=3
    ).save_pretrained(out)
    tok = CLIPTokenizer.from_pretrained(str(out))
    x_all = preprocess_images([Image.fromarray(a) for a in images], _clip_preprocess(out, world.SIZE))
    vocabulary = sorted(set(captions))
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    text = tok(vocabulary, padding=True, return_tensors="pt")
    model = _clip_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(x_all), (64,), generator=gen)
        cap = caption_index[idx]
        used, inverse = torch.unique(cap, return_inverse=True)
        img = F.normalize(_features(model.get_image_features(pixel_values=x_all[idx])), dim=-1)
        txt = _features(
            model.get_text_features(input_ids=text.input_ids[used], attention_mask=text.attention_mask[used])
        )
        txt = F.normalize(txt, dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # (64 images, distinct captions)
        loss_i = F.cross_entropy(logits, inverse)
        # text -> image: each caption's matches share the probability
        match = (inverse[None, :] == torch.arange(len(used))[:, None]).float()
        loss_t = -(F.log_softmax(logits.T, dim=-1) * match / match.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == steps - 1:
            acc = (logits.argmax(-1) == inverse).float().mean().item()
            log(f"clip {step} loss {loss.item():.4f} image->caption acc {acc:.2f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    label_evaluator(
        out,
        "toy-world CLIP stand-in",
        "a small CLIPModel (real CLIP tokenizer) trained contrastively on toy-world images and captions; not "
        "CLIP: its scores mean something only on toy-world images and prompts",
    )
    return out


def write_lpips(out_path, seed: int = 0) -> Path:
    path = build_tiny_lpips(out_path, seed=seed)
    label_evaluator(
        path,
        "random-weight LPIPS (toy world)",
        "the LPIPS layout with random weights: DIV compares random-conv features",
    )
    return path
