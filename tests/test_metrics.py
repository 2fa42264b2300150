"""The metric code against independent computations on the same tiny evaluator models: transformers' own image
processors + the raw model forward + numpy cosines for DINO / CLIP-I, torchmetrics' CLIP score for CLIP-T, and
the metrics' invariants (identical images score 1, the identifier does not change CLIP-T)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lib.errors import ModelLoadError
from dreambooth_lib.evaluate import embedders, lpips, prompts, scores
from dreambooth_lib.testing.evaluators import build_tiny_clip, build_tiny_dino


def _images(n: int, size=(64, 64), seed: int = 0) -> list[Image.Image]:
    """Smooth random images (noise upsampled): distinct, but with structure a ViT can tell apart."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize(size, Image.BILINEAR))
    return out


def _numpy_mean_cosine(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = [float(a[i] @ b[j]) for i in range(len(a)) for j in range(len(b)) if not (exclude_self and i == j)]
    return float(np.mean(sims))


def test_paper_prompts_and_clip_t_text():
    objects, live = prompts.paper_prompts(live=False), prompts.paper_prompts(live=True)
    assert len(objects) == 25 and len(live) == 25
    assert "a {0} {1} floating on top of water" in objects and "a {0} {1} wearing a red hat" in live
    assert "a {0} {1} wearing a red hat" not in objects
    assert prompts.render_prompt(objects[2], "sks", "backpack") == "a sks backpack on the beach"
    assert prompts.clip_t_text("a {0} {1} on the beach", "dog") == "a dog on the beach"
    assert prompts.clip_t_text("a cube shaped {0} {1}", "teddy bear") == "a cube shaped teddy bear"
    assert prompts.clip_t_text("a {1} on the beach", "dog") == "a dog on the beach"


def _dino_reference_processor():
    """DINO's eval transform (shorter side 256 bicubic, centre crop 224, ImageNet mean/std) as transformers'
    own image processor: the independent computation our preprocessing is checked against."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=Image.BICUBIC,
        image_mean=list(embedders.IMAGENET_MEAN),
        image_std=list(embedders.IMAGENET_STD),
        do_convert_rgb=True,
    )


def test_dino_preprocessing_matches_transformers_processor():
    """Resize the shorter side to 256 (bicubic), centre-crop 224, ImageNet mean/std: as an independent processor."""
    ref = _dino_reference_processor()
    images = [*_images(2, size=(300, 400)), *_images(1, size=(64, 64), seed=1)]
    got = embedders.preprocess_images(images, embedders.dino_preprocess(224))
    want = torch.stack(
        [torch.as_tensor(ref(images=[im], return_tensors="np")["pixel_values"][0]) for im in images]
    )
    assert got.shape == (3, 3, 224, 224)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    # 512x288 resizes to 455x256: a 115.5 px margin, which torchvision's CenterCrop (DINO's eval) rounds to 116
    # and transformers floors to 115; the pixels are otherwise the same
    wide = _images(1, size=(512, 288), seed=2)
    got = embedders.preprocess_images(wide, embedders.dino_preprocess(224))[0]
    want = torch.as_tensor(ref(images=wide, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(got[:, :, :-1], want[:, :, 1:].float(), atol=1e-5, rtol=1e-5)
    # a flat image becomes exactly (value/255 - mean) / std per channel
    flat = embedders.preprocess_images(
        [Image.new("RGB", (50, 80), (255, 0, 128))], embedders.dino_preprocess(224)
    )[0]
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(embedders.IMAGENET_MEAN)) / np.array(
        embedders.IMAGENET_STD
    )
    np.testing.assert_allclose(flat.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_dino_matches_direct_computation(tiny_evaluators):
    """CLS of last_hidden_state through ViTModel, preprocessed by transformers, averaged with numpy."""
    from transformers import ViTModel

    generated, real = _images(3, seed=1), _images(2, size=(96, 120), seed=2)
    dino = embedders.DinoEmbedder(tiny_evaluators["dino"])
    got = scores.mean_pairwise_cosine(dino.embed(generated), dino.embed(real))

    proc = _dino_reference_processor()
    model = ViTModel.from_pretrained(tiny_evaluators["dino"], add_pooling_layer=False).eval()

    def cls(images):
        with torch.no_grad():
            px = torch.as_tensor(np.asarray(proc(images=images, return_tensors="np")["pixel_values"]))
            hidden = model(pixel_values=px).last_hidden_state  # after the final layernorm
        return hidden[:, 0].double().numpy()

    want = _numpy_mean_cosine(cls(generated), cls(real))
    assert got == pytest.approx(want, abs=1e-6)
    # the real-image reference: every ordered pair of distinct real images
    real3 = _images(3, seed=7)
    assert scores.mean_cosine_within(dino.embed(real3)) == pytest.approx(
        _numpy_mean_cosine(cls(real3), cls(real3), exclude_self=True), abs=1e-6
    )


def test_clip_i_matches_direct_computation(tiny_evaluators):
    """Projected CLIP image features via CLIPProcessor + vision tower + visual projection, numpy cosines."""
    from transformers import CLIPModel, CLIPProcessor

    generated, real = _images(3, seed=3), _images(2, size=(80, 64), seed=4)
    clip = embedders.ClipEmbedder(tiny_evaluators["clip"])
    got = scores.mean_pairwise_cosine(clip.embed_images(generated), clip.embed_images(real))

    proc = CLIPProcessor.from_pretrained(tiny_evaluators["clip"])
    model = CLIPModel.from_pretrained(tiny_evaluators["clip"]).eval()

    def emb(images):
        with torch.no_grad():
            px = torch.as_tensor(np.asarray(proc(images=images, return_tensors="np")["pixel_values"]))
            pooled = model.vision_model(pixel_values=px).pooler_output
            return model.visual_projection(pooled).double().numpy()

    assert got == pytest.approx(_numpy_mean_cosine(emb(generated), emb(real)), abs=1e-6)


def test_clip_t_matches_torchmetrics(tiny_evaluators):
    """torchmetrics' CLIP score (x100, compared before its clamp at 0) through a transformers-5 adapter."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from transformers import CLIPModel, CLIPProcessor

    class Adapter(torch.nn.Module):
        """transformers 5 returns output objects from get_*_features; torchmetrics expects tensors."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    images = _images(3, seed=5)
    texts = ["a dog on the beach", "a red dog", "a dog wearing a santa hat"]
    clip = embedders.ClipEmbedder(tiny_evaluators["clip"])
    got = scores.paired_cosine(clip.embed_images(images), clip.embed_texts(texts)).numpy()

    adapter = Adapter(CLIPModel.from_pretrained(tiny_evaluators["clip"]).eval())
    tensors = [torch.from_numpy(np.asarray(i).transpose(2, 0, 1).copy()) for i in images]
    with torch.no_grad():
        score, n = _clip_score_update(
            tensors, texts, adapter, CLIPProcessor.from_pretrained(tiny_evaluators["clip"])
        )
    assert n == 3
    np.testing.assert_allclose(got, score.double().numpy() / 100, atol=1e-5)


def test_invariants(tiny_evaluators):
    dino, clip = (
        embedders.DinoEmbedder(tiny_evaluators["dino"]),
        embedders.ClipEmbedder(tiny_evaluators["clip"]),
    )
    img = _images(1, seed=6)
    # identical images score 1.0, in every embedding
    assert scores.mean_pairwise_cosine(dino.embed(img), dino.embed(img)) == pytest.approx(1.0, abs=1e-9)
    assert scores.mean_pairwise_cosine(clip.embed_images(img), clip.embed_images(img)) == pytest.approx(
        1.0, abs=1e-9
    )
    assert scores.mean_cosine_within(dino.embed(img * 3)) == pytest.approx(1.0, abs=1e-9)
    assert scores.mean_cosine_within(dino.embed(img)) is None  # no pair without self-pairs
    # a set against itself minus self-pairs is below the set against itself with them
    many = dino.embed(_images(3, seed=8))
    assert scores.mean_cosine_within(many) < scores.mean_pairwise_cosine(many, many)
    # CLIP-T ignores the identifier: the same text, the same score, with or without {0} in the template
    with_id, without = (
        prompts.clip_t_text("a {0} {1} in the snow", "dog"),
        prompts.clip_t_text("a {1} in the snow", "dog"),
    )
    e = clip.embed_texts([with_id, without])
    assert with_id == without and torch.equal(e[0], e[1])


def test_lpips_diversity(tiny_evaluators):
    from dreambooth_lib.evaluate.lpips import load_lpips

    model, _ = load_lpips(tiny_evaluators["lpips"])
    imgs = _images(3, seed=9)
    assert scores.lpips_diversity(model, [imgs[0], imgs[0]]) == 0.0  # identical images: no diversity
    assert scores.lpips_diversity(model, imgs[:1]) is None
    x = lpips.images_to_lpips_tensor(imgs)
    with torch.no_grad():
        pairs = [float(model(x[i : i + 1], x[j : j + 1])) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert scores.lpips_diversity(model, imgs) == pytest.approx(np.mean(pairs), rel=1e-5)
    assert min(pairs) > 0


def test_tiny_evaluators_are_deterministic(tmp_path, tiny_evaluators):
    from dreambooth_lib.models import model_digest

    assert model_digest(str(build_tiny_dino(tmp_path / "dino", seed=0))) == model_digest(
        tiny_evaluators["dino"]
    )
    assert model_digest(str(build_tiny_clip(tmp_path / "clip", seed=0))) == model_digest(
        tiny_evaluators["clip"]
    )
    assert model_digest(str(build_tiny_dino(tmp_path / "dino1", seed=1))) != model_digest(
        tiny_evaluators["dino"]
    )


def test_wrong_model_folder_is_a_user_error(tmp_path, tiny_evaluators):
    with pytest.raises(ModelLoadError, match="eval.clip_model must be a clip model folder.*found vit"):
        embedders.ClipEmbedder(
            tiny_evaluators["dino"]
        )  # a ViT folder would load as a randomly initialised CLIP
    with pytest.raises(ModelLoadError, match="eval.dino_model must be a vit model folder.*found clip"):
        embedders.DinoEmbedder(tiny_evaluators["clip"])
    with pytest.raises(ModelLoadError, match="no such folder"):
        embedders.DinoEmbedder(str(tmp_path / "missing"))
