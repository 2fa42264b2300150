"""The evaluate step: sample the paper's prompts from a trained model, score DINO / CLIP-I / CLIP-T / PRES / DIV
against the real subject images, and apply the quality gate.

Protocol (DreamBooth, Sec. 4.1): for each prompt template (the paper's 25 for objects or live subjects), render
it with the identifier and class noun and sample `images_per_prompt` images (seed j of every prompt is
`image_seed(config.seed, j)`, so prompts and models are compared on the same noise); sample `pres_images` images
of "a [class noun]" for PRES. The metric definitions are in `dreambooth_lib.evaluate.scores`.

A failing gate does not raise here: the images, metrics.json and report are kept with the verdict recorded, and
the register step refuses the model (GateFailed) by reading metrics.json's `gate`.

Writes `out/images/<prompt-slug>/NN.png`, `out/images/_pres/NN.png` (and `out/images/_base/<prompt-slug>/NN.png`
with gate.compare_to_base), `out/report.html`, and last `out/metrics.json` (the EvalResult).
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from dreambooth_lib import storage
from dreambooth_lib.config import EvalConfig, GateConfig
from dreambooth_lib.errors import ConfigError, IngestError

METRICS_NAME = "metrics.json"
REPORT_NAME = "report.html"
PRES_DIR = "_pres"
BASE_DIR = "_base"
METRIC_KEYS = ("dino", "clip_i", "clip_t", "pres", "div")


class GateVerdict(BaseModel):
    """The quality gate's decision: each configured check with its value, and why it failed (if it did)."""

    passed: bool
    reasons: list[str] = Field(default_factory=list)
    checks: list[dict[str, Any]] = Field(default_factory=list)


class PromptMetrics(BaseModel):
    template: str
    prompt: str = Field(description="the template rendered with identifier and class noun (what was sampled)")
    clip_t_text: str = Field(description="the prompt without the identifier, which CLIP-T scores against")
    images: list[str] = Field(description="paths relative to the eval folder")
    dino: float
    clip_i: float
    clip_t: float
    div: float | None


class EvalResult(BaseModel):
    """Everything metrics.json holds: per-prompt and overall metrics, the real-image reference, the gate."""

    model: str
    base_model: str | None = None
    subject: str | None = None
    identifier: str
    class_noun: str
    live: bool
    metrics: dict[str, float | None] = Field(description="overall dino, clip_i, clip_t, pres, div")
    per_prompt: list[PromptMetrics]
    reference: dict[str, Any] = Field(
        description="DINO / CLIP-I among the real images, and the paper's numbers"
    )
    base: dict[str, Any] | None = Field(None, description="the base model's metrics (gate.compare_to_base)")
    gate: GateVerdict
    notes: list[str] = Field(default_factory=list)
    config: dict[str, Any]
    resolution: int
    digests: dict[str, str | None]
    counts: dict[str, int]
    real_images: list[str]
    pres_images: list[str] = Field(description="paths relative to the eval folder")
    metrics_json: str
    report_html: str
    wall_time_s: float
    step_times_s: dict[str, float] = Field(default_factory=dict)


# --- the gate --------------------------------------------------------------------------------------------------

# (gate field, metric key, comparison, label, what to do when the metric was not computed)
_THRESHOLDS = (
    ("min_dino", "dino", ">=", "DINO", ""),
    ("min_clip_i", "clip_i", ">=", "CLIP-I", ""),
    ("min_clip_t", "clip_t", ">=", "CLIP-T", ""),
    ("max_pres", "pres", "<=", "PRES", "set eval.pres_images above 0"),
    ("min_div", "div", ">=", "DIV", "set eval.lpips_weights and images_per_prompt >= 2"),
)


def evaluate_gate(metrics: dict, gate: GateConfig, base_metrics: dict | None = None) -> GateVerdict:
    """Check each configured threshold (None disables one); a threshold on a metric that was not computed fails."""
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    for field, key, op, label, hint in _THRESHOLDS:
        threshold = getattr(gate, field)
        if threshold is None:
            continue
        value = metrics.get(key)
        if value is None:
            passed = False
            reasons.append(
                f"{label} was not computed, so gate.{field} cannot be checked: {hint or 'see notes'}"
                f" or remove gate.{field}"
            )
        else:
            passed = value >= threshold if op == ">=" else value <= threshold
            if not passed:
                side = "below" if op == ">=" else "above"
                reasons.append(f"{label} {value:.4f} is {side} gate.{field} = {threshold}")
        checks.append(
            {"name": field, "metric": key, "op": op, "threshold": threshold, "value": value, "passed": passed}
        )
    if gate.compare_to_base:
        base_dino = (base_metrics or {}).get("dino")
        value = metrics.get("dino")
        if base_dino is None or value is None:
            passed = False
            required = None
            reasons.append(
                "gate.compare_to_base is set but the base model's DINO is missing; evaluate with a base_model"
            )
        else:
            required = base_dino + gate.min_dino_gain_vs_base
            passed = value >= required
            if not passed:
                reasons.append(
                    f"DINO {value:.4f} is below the base model's {base_dino:.4f} + "
                    f"gate.min_dino_gain_vs_base {gate.min_dino_gain_vs_base} = {required:.4f}"
                )
        checks.append(
            {
                "name": "dino_vs_base",
                "metric": "dino",
                "op": ">=",
                "threshold": required,
                "value": value,
                "base": base_dino,
                "passed": passed,
            }
        )
    return GateVerdict(passed=not reasons, reasons=reasons, checks=checks)


# --- helpers ---------------------------------------------------------------------------------------------------


def prompt_slug(prompt: str) -> str:
    """The folder name of a prompt's images: the same rule as `dreambooth generate` uses."""
    from dreambooth_lib.generate import slugify

    return slugify(prompt)


def _unique_slugs(prompts: list[str]) -> list[str]:
    from dreambooth_lib.generate import unique_slugs

    return unique_slugs(prompts)


def eval_templates(config: EvalConfig, live: bool) -> list[str]:
    """The prompt templates evaluated: config.prompts or the paper's list, cut to max_prompts."""
    from dreambooth_lib.evaluate.scores import paper_prompts

    templates = list(config.prompts) if config.prompts is not None else paper_prompts(live)
    if config.max_prompts is not None:
        templates = templates[: config.max_prompts]
    if not templates:
        raise ConfigError("eval.prompts: empty; give at least one template such as 'a {0} {1} on the beach'")
    for t in templates:
        try:
            t.format("sks", "dog")
        except (IndexError, KeyError, ValueError) as err:
            raise ConfigError(
                f"eval.prompts: template {t!r} cannot be rendered ({err}); use only {{0}} (identifier) and "
                "{1} (class noun), and double other braces"
            ) from None
    return templates


def real_image_uris(real_images: str) -> list[str]:
    files = [f for f in storage.list_files(real_images, recursive=False) if f.lower().endswith(".png")]
    if not files:
        raise IngestError(
            f"{real_images}: no .png images; pass the output folder of the ingest step (NN.png)"
        )
    return files


def _read_image(uri: str) -> Image.Image:
    img = Image.open(io.BytesIO(storage.read_bytes(uri)))
    img.load()
    return img.convert("RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _save_group(out: str, folder: str, images: list[Image.Image]) -> list[str]:
    rel = []
    for j, img in enumerate(images):
        path = f"images/{folder}/{j:02d}.png"
        storage.write_bytes(storage.join(out, *path.split("/")), _png_bytes(img))
        rel.append(path)
    return rel


def _sample(
    pipe: Any, prompts: list[str], n: int, config: EvalConfig, resolution: int
) -> list[list[Image.Image]]:
    """n images per prompt, image j of every prompt from seed image_seed(config.seed, j), batched across prompts."""
    from dreambooth_lib.models.sampling import image_seed, sample_images

    flat = [p for p in prompts for _ in range(n)]
    seeds = [image_seed(config.seed, j) for _ in prompts for j in range(n)]
    images = sample_images(
        pipe,
        flat,
        seeds,
        steps=config.steps,
        sampler=config.sampler,
        guidance_scale=config.guidance_scale,
        resolution=resolution,
        batch_size=config.batch_size,
    )
    return [images[i * n : (i + 1) * n] for i in range(len(prompts))]


def _load_pipe(uri: str, device: str, allow_pickle: bool, base_model: str | None, compile: bool = False):
    from dreambooth_lib.models import load_pipeline, resolve_dtype
    from dreambooth_lib.models.sampling import compile_for_sampling

    dtype = resolve_dtype("auto", device)
    pipe = load_pipeline(
        uri, allow_pickle=allow_pickle, torch_dtype=dtype, device=device, base_model=base_model
    )
    return compile_for_sampling(pipe) if compile else pipe


def _release(pipe: Any) -> None:
    import torch

    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _lora_base(model: str, allow_pickle: bool) -> str | None:
    from dreambooth_lib.models import is_lora_dir, read_lora_marker, resolve_model_dir

    local = resolve_model_dir(model, allow_pickle=allow_pickle)
    return read_lora_marker(local)["base_model"] if is_lora_dir(local) else None


def _score_groups(
    groups, templates, prompts, class_noun, real_dino, real_clip, dino, clip, lpips_model, device
):
    """Per-prompt and overall DINO, CLIP-I, CLIP-T (and DIV with an LPIPS model) of one model's images."""
    import torch

    from dreambooth_lib.evaluate import scores as M

    texts = [M.clip_t_text(t, class_noun) for t in templates]
    text_emb = clip.embed_texts(texts)
    per_prompt, all_dino, all_clip, clip_t_all, divs = [], [], [], [], []
    for i, images in enumerate(groups):
        d = dino.embed(images)
        c = clip.embed_images(images)
        ct = M.paired_cosine(c, text_emb[i : i + 1].expand(len(images), -1))
        div = M.lpips_diversity(lpips_model, images, device) if lpips_model is not None else None
        all_dino.append(d)
        all_clip.append(c)
        clip_t_all.append(ct)
        if div is not None:
            divs.append(div)
        per_prompt.append(
            {
                "template": templates[i],
                "prompt": prompts[i],
                "clip_t_text": texts[i],
                "dino": M.mean_pairwise_cosine(d, real_dino),
                "clip_i": M.mean_pairwise_cosine(c, real_clip),
                "clip_t": float(ct.mean()),
                "div": div,
            }
        )
    overall = {
        # every generated image x every real image, pooled over prompts (as the paper averages)
        "dino": M.mean_pairwise_cosine(torch.cat(all_dino), real_dino),
        "clip_i": M.mean_pairwise_cosine(torch.cat(all_clip), real_clip),
        "clip_t": float(torch.cat(clip_t_all).mean()),
        "div": sum(divs) / len(divs) if divs and lpips_model is not None else None,
    }
    return per_prompt, overall


def training_summary_of(model: str) -> dict | None:
    """The train_summary.json beside a trained model folder (`train` writes out/model and out/train_summary.json),
    or None for any other model (a base model, a copied artifact)."""
    from dreambooth_lib.train import SUMMARY_NAME

    model = str(model).rstrip("/")
    if "/" not in model or storage.basename(model) != "model":
        return None
    uri = storage.join(model.rsplit("/", 1)[0], SUMMARY_NAME)
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except Exception:  # an unreadable summary only costs the report its loss curve
        return None


def _render_report(
    out: str, result: EvalResult, prior_images: list[str] | None, training: dict | None
) -> None:
    from dreambooth_lib.evaluate.report import render_report

    def uris(rel_paths: list[str]) -> list[str]:
        return [storage.join(out, *r.split("/")) for r in rel_paths]

    grid = [(p.prompt, uris(p.images)) for p in result.per_prompt]
    if result.pres_images:
        grid.append((f"a {result.class_noun} (PRES: the class prompt)", uris(result.pres_images)))
    for p in (result.base or {}).get("per_prompt", []):
        grid.append((f"{p['prompt']} (base model)", uris(p["images"])))
    render_report(
        storage.join(out, REPORT_NAME),
        subject=result.subject or result.class_noun,
        class_noun=result.class_noun,
        identifier=result.identifier,
        input_images=result.real_images,
        prior_images=list(prior_images or []),
        grid=grid,
        metrics=dict(result.metrics),
        reference=result.reference,
        gate=result.gate.model_dump(mode="json"),
        training=training,
        extra={
            "per_prompt": [p.model_dump(mode="json") for p in result.per_prompt],
            "base": result.base,
            "notes": result.notes,
            "digests": result.digests,
            "counts": result.counts,
            "resolution": result.resolution,
            "config": result.config,
        },
    )


# --- the step --------------------------------------------------------------------------------------------------


def run(
    model: str,
    real_images: str,
    identifier: str,
    class_noun: str,
    live: bool,
    config: EvalConfig,
    out: str,
    base_model: str | None = None,
    allow_pickle: bool = False,
    prior_images: list[str] | None = None,
    subject_name: str | None = None,
) -> EvalResult:
    """Evaluate `model` (a diffusers folder or our LoRA folder) on the subject's ingested images, by the paper.

    base_model: for a LoRA artifact, the base it applies to (default: the one its dreambooth_lora.json names);
    with gate.compare_to_base, the model evaluated on the same prompts for the DINO comparison.
    prior_images: class-prior image URIs shown in the report. Returns the EvalResult also written as metrics.json.
    """
    import torch

    from dreambooth_lib.evaluate import scores as M
    from dreambooth_lib.models import model_digest, resolve_device
    from dreambooth_lib.models.sampling import default_resolution

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    out = str(out)
    templates = eval_templates(config, live)
    prompts = [M.render_prompt(t, identifier, class_noun) for t in templates]
    slugs = _unique_slugs(prompts)
    real_uris = real_image_uris(real_images)
    lora_base = _lora_base(model, allow_pickle)
    compare_base = base_model or lora_base
    if config.gate.compare_to_base and compare_base is None:
        raise ConfigError(
            "eval.gate.compare_to_base is set but no base model is known; pass base_model (--base-model) "
            "or evaluate a LoRA artifact (its dreambooth_lora.json names the base)"
        )
    notes: list[str] = []
    if not all("{0}" in t for t in templates):
        notes.append("some prompt templates lack {0}: those images do not show the identifier to the model")
    device = resolve_device(config.device)

    # evaluators first: a wrong dino_model / clip_model / lpips_weights fails before minutes of sampling
    tic = time.perf_counter()
    dino = M.dino_embedder(config.dino_model, device, allow_pickle)
    clip = M.clip_embedder(config.clip_model, device, allow_pickle)
    lpips_model, lpips_digest = None, None
    if config.lpips_weights is not None:
        from dreambooth_lib.evaluate.lpips import load_lpips

        lpips_model, lpips_digest = load_lpips(config.lpips_weights)
        lpips_model.to(device)
    else:
        notes.append(
            "DIV is null: eval.lpips_weights is not set (convert the published LPIPS weights with "
            "dreambooth_lib.evaluate.lpips.convert_lpips_checkpoint and point eval.lpips_weights at the file)"
        )
    real = [_read_image(u) for u in real_uris]
    real_dino, real_clip = dino.embed(real), clip.embed_images(real)
    if len(real) < 2:
        notes.append("one real image: the real-image reference (self-pairs excluded) is null")
    times["load_evaluators"] = time.perf_counter() - tic

    tic = time.perf_counter()
    pipe = _load_pipe(model, device, allow_pickle, base_model, config.compile)
    resolution = config.resolution or default_resolution(pipe)
    groups = _sample(pipe, prompts, config.images_per_prompt, config, resolution)
    pres_groups = (
        _sample(pipe, [f"a {class_noun}"], config.pres_images, config, resolution)
        if config.pres_images
        else [[]]
    )
    _release(pipe)
    image_paths = [_save_group(out, slug, imgs) for slug, imgs in zip(slugs, groups, strict=True)]
    pres_paths = _save_group(out, PRES_DIR, pres_groups[0])
    times["sample"] = time.perf_counter() - tic

    base_section = None
    if config.gate.compare_to_base:
        tic = time.perf_counter()
        # the base model sees the same identifier prompts: how much of the subject the prompt alone gives
        pipe = _load_pipe(compare_base, device, allow_pickle, None, config.compile)
        base_groups = _sample(pipe, prompts, config.images_per_prompt, config, resolution)
        _release(pipe)
        base_paths = [_save_group(out, f"{BASE_DIR}/{s}", g) for s, g in zip(slugs, base_groups, strict=True)]
        base_pp, base_overall = _score_groups(
            base_groups, templates, prompts, class_noun, real_dino, real_clip, dino, clip, lpips_model, device
        )
        for p, paths in zip(base_pp, base_paths, strict=True):
            p["images"] = paths
        base_section = {"model": compare_base, "metrics": base_overall, "per_prompt": base_pp}
        times["base"] = time.perf_counter() - tic

    tic = time.perf_counter()
    with torch.inference_mode():
        per_prompt, overall = _score_groups(
            groups, templates, prompts, class_noun, real_dino, real_clip, dino, clip, lpips_model, device
        )
        overall["pres"] = (
            M.mean_pairwise_cosine(dino.embed(pres_groups[0]), real_dino) if pres_groups[0] else None
        )
    if config.pres_images == 0:
        notes.append("PRES is null: eval.pres_images is 0")
    if lpips_model is not None and config.images_per_prompt < 2:
        notes.append("DIV is null: it needs images_per_prompt >= 2 (pairs of images of one prompt)")
    times["score"] = time.perf_counter() - tic

    metrics = {k: overall.get(k) for k in METRIC_KEYS}
    gate = evaluate_gate(metrics, config.gate, base_section["metrics"] if base_section else None)
    digests = {
        "model": model_digest(model, allow_pickle=allow_pickle),
        # the base is hashed only when it shaped the numbers (a LoRA's base, or the comparison): hashing a
        # multi-GB base model just to record it would cost more than a short evaluation
        "base_model": model_digest(compare_base, allow_pickle=allow_pickle)
        if compare_base and (lora_base is not None or config.gate.compare_to_base)
        else None,
        "dino": model_digest(config.dino_model, allow_pickle=allow_pickle),
        "clip": model_digest(config.clip_model, allow_pickle=allow_pickle),
        "lpips": lpips_digest,
    }
    result = EvalResult(
        model=model,
        base_model=compare_base,
        subject=subject_name,
        identifier=identifier,
        class_noun=class_noun,
        live=live,
        metrics=metrics,
        per_prompt=[
            PromptMetrics(images=paths, **p) for p, paths in zip(per_prompt, image_paths, strict=True)
        ],
        reference={
            "dino": M.mean_cosine_within(real_dino),
            "clip_i": M.mean_cosine_within(real_clip),
            "n_images": len(real),
            "paper": M.PAPER_REFERENCE,
        },
        base=base_section,
        gate=gate,
        notes=notes,
        config=config.model_dump(mode="json"),
        resolution=resolution,
        digests=digests,
        counts={
            "real_images": len(real),
            "prompts": len(prompts),
            "images_per_prompt": config.images_per_prompt,
            "generated": sum(len(g) for g in groups),
            "pres_images": len(pres_paths),
            "base_generated": sum(len(p["images"]) for p in base_section["per_prompt"])
            if base_section
            else 0,
        },
        real_images=real_uris,
        pres_images=pres_paths,
        metrics_json=storage.join(out, METRICS_NAME),
        report_html=storage.join(out, REPORT_NAME),
        wall_time_s=0.0,
        step_times_s={k: round(v, 3) for k, v in times.items()},
    )
    _render_report(out, result, prior_images, training_summary_of(model))
    result.wall_time_s = round(time.perf_counter() - t0, 3)
    # metrics.json last: its presence means the evaluation is complete (register reads it)
    storage.write_json(result.metrics_json, result.model_dump(mode="json"))
    return result


def load_metrics(out: str) -> EvalResult:
    """The EvalResult of an evaluation folder (its metrics.json)."""
    from dreambooth_lib.errors import StorageError

    uri = storage.join(str(out), METRICS_NAME)
    if not storage.exists(uri):
        raise StorageError(f"{uri}: not found; run the evaluate step into {out} first")
    return EvalResult.model_validate(storage.read_json(uri))
