"""The evaluate step on the tiny SD model with tiny evaluators: artifacts, metrics recomputed from the saved
images, seeds, the quality gate (recorded, not raised), base-model comparison, gs:// I/O and user errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_lib import evaluate, generate, storage
from dreambooth_lib.config import EvalConfig, GateConfig
from dreambooth_lib.errors import ConfigError, IngestError, ModelLoadError, StorageError
from dreambooth_lib.evaluate import embedders, scores
from dreambooth_lib.evaluate.evaluation import evaluator_label
from dreambooth_lib.testing.synthetic import make_subject_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_evaluators) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval")
    return {**tiny_evaluators, "real": str(make_subject_images(root / "ingest", n=3, size=64))}


def _config(setup, **kwargs) -> EvalConfig:
    base = {
        "max_prompts": 2,
        "images_per_prompt": 2,
        "pres_images": 2,
        "steps": 2,
        "batch_size": 4,
        "device": "cpu",
        "dino_model": setup["dino"],
        "clip_model": setup["clip"],
        "lpips_weights": setup["lpips"],
    }
    return EvalConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def evaluated(setup, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out") / "eval"
    result = evaluate.run(
        tiny_model,
        setup["real"],
        "sks",
        "dog",
        True,
        _config(setup),
        str(out),
        subject_name="red-square",
        prior_images=[],
    )
    return result, out


def test_writes_images_metrics_and_report(evaluated):
    result, out = evaluated
    assert [p.prompt for p in result.per_prompt] == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert result.per_prompt[0].clip_t_text == "a dog in the jungle"
    for p in result.per_prompt:
        assert p.images == [f"images/{generate.slugify(p.prompt)}/{j:02d}.png" for j in range(2)]
        for rel in p.images:
            assert Image.open(out / rel).size == (64, 64)
    assert [Image.open(out / r).size for r in result.pres_images] == [(64, 64)] * 2
    assert result.pres_images[0] == "images/_pres/00.png"
    page = (out / "report.html").read_text()
    assert (
        'id="metric-dino"' in page and "a sks dog in the snow" in page and 'id="gate" class="passed"' in page
    )
    assert "a dog (PRES: the class prompt)" in page
    # what scored is named: the stand-ins by their labels
    assert result.evaluators == {
        "dino": "tiny random-weight ViT (DINO layout)",
        "clip": "tiny random-weight CLIP",
        "lpips": "random-weight LPIPS",
    }
    assert 'id="evaluators"' in page and "tiny random-weight CLIP" in page
    assert result.counts == {
        "real_images": 3,
        "prompts": 2,
        "images_per_prompt": 2,
        "generated": 4,
        "pres_images": 2,
        "base_generated": 0,
    }
    assert set(result.digests) == {"model", "base_model", "dino", "clip", "lpips"}
    assert all(len(result.digests[k]) == 64 for k in ("model", "dino", "clip", "lpips"))
    assert result.digests["base_model"] is None  # no base was used
    assert result.gate.passed and result.gate.checks == []  # no thresholds configured
    assert result.reference["paper"]["real_images"] == {"dino": 0.774, "clip_i": 0.885}
    # metrics.json is the EvalResult
    assert evaluate.load_metrics(str(out)) == result
    assert storage.read_json(str(out / "metrics.json"))["gate"]["passed"] is True


def test_metrics_recomputed_from_saved_images(evaluated, setup):
    """The numbers in metrics.json are the paper's definitions applied to the images on disk."""
    result, out = evaluated
    dino, clip = embedders.DinoEmbedder(setup["dino"]), embedders.ClipEmbedder(setup["clip"])
    from dreambooth_lib.evaluate.lpips import load_lpips

    lp, _ = load_lpips(setup["lpips"])
    real = [Image.open(p).convert("RGB") for p in sorted(Path(setup["real"]).glob("*.png"))]
    gen = [[Image.open(out / r).convert("RGB") for r in p.images] for p in result.per_prompt]
    flat = [im for g in gen for im in g]
    r_dino, r_clip = dino.embed(real).numpy(), clip.embed_images(real).numpy()

    def mean_cos(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return float((a @ b.T).mean())

    assert result.metrics["dino"] == pytest.approx(mean_cos(dino.embed(flat).numpy(), r_dino), abs=1e-6)
    assert result.metrics["clip_i"] == pytest.approx(
        mean_cos(clip.embed_images(flat).numpy(), r_clip), abs=1e-6
    )
    texts = clip.embed_texts(["a dog in the jungle", "a dog in the snow"]).numpy()
    img_emb = clip.embed_images(flat).numpy()
    clip_t = [mean_cos(img_emb[i : i + 1], texts[i // 2 : i // 2 + 1]) for i in range(4)]
    assert result.metrics["clip_t"] == pytest.approx(np.mean(clip_t), abs=1e-6)
    pres = [Image.open(out / r).convert("RGB") for r in result.pres_images]
    assert result.metrics["pres"] == pytest.approx(mean_cos(dino.embed(pres).numpy(), r_dino), abs=1e-6)
    divs = [scores.lpips_diversity(lp, g) for g in gen]
    assert [p.div for p in result.per_prompt] == pytest.approx(divs, rel=1e-6)
    assert result.metrics["div"] == pytest.approx(np.mean(divs), rel=1e-6) and result.metrics["div"] > 0
    r = r_dino / np.linalg.norm(r_dino, axis=1, keepdims=True)
    sims = r @ r.T
    assert result.reference["dino"] == pytest.approx((sims.sum() - np.trace(sims)) / 6, abs=1e-6)


def test_image_j_uses_seed_j(evaluated, tiny_model):
    """Image j of every prompt is sampled from image_seed(config.seed, j), whatever batch it fell in."""
    from dreambooth_lib.models import load_pipeline
    from dreambooth_lib.models.sampling import image_seed, sample_images

    result, out = evaluated
    pipe = load_pipeline(tiny_model)
    again, other = sample_images(
        pipe, ["a sks dog in the snow"] * 2, [image_seed(0, 1), image_seed(0, 0)], steps=2, resolution=64
    )
    saved = np.asarray(Image.open(out / result.per_prompt[1].images[1]), dtype=np.int16)
    # equal up to float rounding: a batch of 4 and a batch of 2 take different CPU kernels
    assert np.abs(np.asarray(again, dtype=np.int16) - saved).max() <= 2
    assert np.abs(np.asarray(other, dtype=np.int16) - saved).mean() > 10


def test_evaluate_gate_thresholds():
    metrics = {"dino": 0.6, "clip_i": 0.8, "clip_t": 0.3, "pres": 0.5, "div": None}
    ok = evaluate.evaluate_gate(metrics, GateConfig(min_dino=0.5, min_clip_t=0.25, max_pres=0.6))
    assert (
        ok.passed
        and ok.reasons == []
        and [c["name"] for c in ok.checks] == ["min_dino", "min_clip_t", "max_pres"]
    )
    bad = evaluate.evaluate_gate(metrics, GateConfig(min_dino=0.7, max_pres=0.4, min_clip_i=0.8))
    assert not bad.passed
    assert bad.reasons == [
        "DINO 0.6000 is below gate.min_dino = 0.7",
        "PRES 0.5000 is above gate.max_pres = 0.4",
    ]
    missing = evaluate.evaluate_gate(metrics, GateConfig(min_div=0.1))
    assert not missing.passed and "eval.lpips_weights" in missing.reasons[0]
    vs_base = evaluate.evaluate_gate(
        metrics, GateConfig(compare_to_base=True, min_dino_gain_vs_base=0.05), {"dino": 0.58}
    )
    assert not vs_base.passed and "base model's 0.5800" in vs_base.reasons[0]
    assert vs_base.checks[0]["threshold"] == pytest.approx(0.63)
    assert evaluate.evaluate_gate(metrics, GateConfig(compare_to_base=True), {"dino": 0.58}).passed
    no_base = evaluate.evaluate_gate(metrics, GateConfig(compare_to_base=True), None)
    assert not no_base.passed and "base_model" in no_base.reasons[0]


def test_failing_gate_is_recorded_not_raised(setup, tiny_model, tmp_path):
    """Same model as base, same seeds: equal DINO, so a required gain fails; no LPIPS: DIV null, min_div fails."""
    cfg = _config(
        setup,
        max_prompts=1,
        pres_images=0,
        lpips_weights=None,
        gate={"compare_to_base": True, "min_dino_gain_vs_base": 0.01, "min_div": 0.0},
    )
    result = evaluate.run(
        tiny_model, setup["real"], "sks", "dog", False, cfg, str(tmp_path / "eval"), base_model=tiny_model
    )
    assert result.base["metrics"]["dino"] == pytest.approx(result.metrics["dino"], abs=1e-9)
    assert result.digests["base_model"] == result.digests["model"]
    assert result.metrics["div"] is None and result.metrics["pres"] is None
    assert any("eval.lpips_weights is not set" in n for n in result.notes)
    assert not result.gate.passed
    assert any("gate.min_div" in r for r in result.gate.reasons)
    assert any("gate.min_dino_gain_vs_base" in r for r in result.gate.reasons)
    saved = storage.read_json(str(tmp_path / "eval" / "metrics.json"))
    assert saved["gate"]["passed"] is False and saved["gate"]["reasons"] == result.gate.reasons
    assert (
        tmp_path / "eval" / "images" / "_base" / "a-sks-dog-on-a-cobblestone-street" / "00.png"
    ).exists() is False
    assert (tmp_path / "eval" / "images" / "_base" / "a-sks-dog-in-the-jungle" / "01.png").exists()


def test_gcs_input_and_output(setup, tiny_model, gcs_bucket):
    for f in sorted(Path(setup["real"]).glob("*.png")):
        storage.upload_file(f, f"{gcs_bucket}/ingest/{f.name}")
    storage.write_json(f"{gcs_bucket}/ingest/manifest.json", {"images": 3})
    cfg = _config(setup, max_prompts=1, images_per_prompt=2, pres_images=1, lpips_weights=None)
    result = evaluate.run(tiny_model, f"{gcs_bucket}/ingest", "sks", "dog", False, cfg, f"{gcs_bucket}/eval")
    assert result.counts["real_images"] == 3  # the manifest is not an image
    files = storage.list_files(f"{gcs_bucket}/eval")
    assert f"{gcs_bucket}/eval/images/a-sks-dog-in-the-jungle/01.png" in files
    assert f"{gcs_bucket}/eval/images/_pres/00.png" in files
    assert f"{gcs_bucket}/eval/report.html" in files
    assert evaluate.load_metrics(f"{gcs_bucket}/eval") == result
    # a label is read from gs:// too; a hub id has none and is named as it is
    storage.upload_file(Path(setup["clip"]) / "evaluator.json", f"{gcs_bucket}/clip/evaluator.json")
    assert evaluator_label(f"{gcs_bucket}/clip") == "tiny random-weight CLIP"
    assert evaluator_label("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


def test_user_errors(setup, tiny_model, tmp_path):
    cfg = _config(setup, max_prompts=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="empty: no .png images"):
        evaluate.run(tiny_model, str(tmp_path / "empty"), "sks", "dog", False, cfg, str(tmp_path / "o"))

    def evaluate_real(config: EvalConfig):
        return evaluate.run(tiny_model, setup["real"], "sks", "dog", False, config, str(tmp_path / "o"))

    with pytest.raises(ConfigError, match=r"eval.prompts: template 'a \{2\} dog' cannot be rendered"):
        evaluate_real(_config(setup, prompts=["a {2} dog"]))
    with pytest.raises(ConfigError, match="compare_to_base.*base_model"):
        evaluate_real(_config(setup, gate={"compare_to_base": True}))
    with pytest.raises(StorageError, match="run the evaluate step"):
        evaluate.load_metrics(str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before any sampling


def _fresh_lora(tiny_model: str, out: Path) -> Path:
    """A LoRA folder as training writes it (weights + dreambooth_lora.json naming tiny_model as the base), B = 0."""
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth_lib.models import family_of, lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    family = family_of(pipe)
    torch.manual_seed(0)
    lora.add_denoiser_adapter(pipe.unet, family.denoiser_lora_targets, rank=4, alpha=None)
    marker = {"base_model": tiny_model, "identifier": "sks", "class_noun": "dog", "rank": 4, "alpha": 4.0}
    family.save_lora(out, pipe.unet, {}, marker)
    return out


def test_lora_artifact_is_compared_to_the_base_its_marker_names(setup, tiny_model, tmp_path):
    """A fresh LoRA (B = 0) equals its base: same seeds, same images, equal DINO; the base comes from the marker."""
    from dreambooth_lib.models import model_digest

    lora = _fresh_lora(tiny_model, tmp_path / "lora")
    cfg = _config(setup, max_prompts=1, pres_images=0, lpips_weights=None, gate={"compare_to_base": True})
    result = evaluate.run(str(lora), setup["real"], "sks", "dog", False, cfg, str(tmp_path / "eval"))
    assert result.base_model == tiny_model
    assert result.digests["base_model"] == model_digest(tiny_model)
    assert result.base["metrics"]["dino"] == pytest.approx(result.metrics["dino"], abs=1e-6)
    assert result.gate.passed and result.gate.checks[0]["name"] == "dino_vs_base"


def test_diffusers_lora_folder_is_evaluated_on_the_base_model_given(setup, tiny_model, tmp_path):
    """A LoRA folder as diffusers' train_dreambooth_lora.py writes it (the weights alone, no dreambooth_lora.json)
    is evaluated on base_model (--base-model); without one it is refused with a ModelLoadError naming the flag."""
    from dreambooth_lib.models import LORA_MARKER_NAME, model_digest

    lora = _fresh_lora(tiny_model, tmp_path / "lora")
    (lora / LORA_MARKER_NAME).unlink()
    cfg = _config(setup, max_prompts=1, pres_images=0, lpips_weights=None)
    with pytest.raises(ModelLoadError, match="does not name its base model.*--base-model"):
        evaluate.run(str(lora), setup["real"], "sks", "dog", False, cfg, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()  # refused before any sampling

    result = evaluate.run(
        str(lora), setup["real"], "sks", "dog", False, cfg, str(tmp_path / "eval"), base_model=tiny_model
    )
    assert result.base_model == tiny_model
    assert result.digests["base_model"] == model_digest(tiny_model)  # the base shaped every image
    plain = evaluate.run(tiny_model, setup["real"], "sks", "dog", False, cfg, str(tmp_path / "plain"))
    assert result.metrics["dino"] == pytest.approx(
        plain.metrics["dino"], abs=1e-6
    )  # B = 0: the base's images


def test_each_model_is_freed_before_the_next_loads(setup, tiny_model, tmp_path, monkeypatch):
    """With compare_to_base the fine-tuned model's weights are freed before the base model loads, so the two never
    share the GPU; and none stays in memory after the step."""
    import weakref

    from dreambooth_lib import models

    unet_modules: list[list[weakref.ref]] = []  # of each pipeline loaded, in order
    alive_at_load: list[int] = []
    load_pipeline = models.load_pipeline

    def tracked_load_pipeline(*args, **kwargs):
        alive_at_load.append(sum(ref() is not None for refs in unet_modules for ref in refs))
        pipe = load_pipeline(*args, **kwargs)
        unet_modules.append([weakref.ref(m) for m in pipe.unet.modules()])
        return pipe

    monkeypatch.setattr(models, "load_pipeline", tracked_load_pipeline)
    cfg = _config(
        setup,
        max_prompts=1,
        images_per_prompt=1,
        pres_images=0,
        lpips_weights=None,
        gate={"compare_to_base": True},
    )
    evaluate.run(
        tiny_model, setup["real"], "sks", "dog", False, cfg, str(tmp_path / "e"), base_model=tiny_model
    )
    assert len(unet_modules) == 2 and alive_at_load == [0, 0]
    assert not any(ref() is not None for refs in unet_modules for ref in refs)


def test_release_frees_a_pipeline_its_caller_still_holds(tiny_model):
    import weakref

    from dreambooth_lib.evaluate.samples import release_pipeline
    from dreambooth_lib.models import load_pipeline

    pipe = load_pipeline(tiny_model)
    unet_modules = [weakref.ref(m) for m in pipe.unet.modules()]
    release_pipeline(pipe)
    assert pipe is not None and not any(ref() is not None for ref in unet_modules)


def test_compiled_sampling_gives_the_same_metrics(setup, tiny_model, tmp_path, evaluated, monkeypatch):
    """eval.compile changes how fast the images come, not which: same metrics as the eager evaluation."""
    import torch

    from dreambooth_lib import models

    monkeypatch.setattr(
        models.device, "COMPILE_BACKEND", "aot_eager"
    )  # dynamo's tracing without inductor's codegen
    torch._dynamo.reset()
    try:
        compiled = evaluate.run(
            tiny_model, setup["real"], "sks", "dog", True, _config(setup, compile=True), str(tmp_path / "e"),
            subject_name="red-square", prior_images=[],
        )  # fmt: skip
    finally:
        torch._dynamo.reset()
    eager, _ = evaluated
    for name, value in eager.metrics.items():
        if value is None:
            assert compiled.metrics[name] is None
        else:
            assert compiled.metrics[name] == pytest.approx(value, abs=1e-3), name
