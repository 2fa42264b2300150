"""The evaluate step: sample the paper's prompts from a trained model, score DINO / CLIP-I / CLIP-T / PRES / DIV
against the real subject images, and apply the quality gate.

Protocol (DreamBooth, Sec. 4.1): for each prompt template (the paper's 25 for objects or live subjects), render
it with the identifier and class noun and sample `images_per_prompt` images (seed j of every prompt is
`image_seed(config.seed, j)`, so prompts and models are compared on the same noise); sample `pres_images` images
of "a [class noun]" from the fine-tuned model for PRES. The metric definitions are in
`dreambooth_lib.evaluate.scores`, the prompts in `.prompts`, the gate in `.gate`.

A failing gate does not raise here: the images, metrics.json and report are kept with the verdict recorded, and
the register step refuses the model (GateFailed) by reading metrics.json's `gate`.

Writes `out/images/<prompt-slug>/NN.png`, `out/images/_pres/NN.png` (and `out/images/_base/<prompt-slug>/NN.png`
with gate.compare_to_base), `out/report.html`, and last `out/metrics.json` (the EvalResult).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from dreambooth_lib import storage
from dreambooth_lib.artifacts import EVALUATOR_LABEL_NAME, METRICS_NAME, REPORT_NAME
from dreambooth_lib.config import EvalConfig
from dreambooth_lib.errors import ConfigError, IngestError, StorageError
from dreambooth_lib.evaluate.gate import GateVerdict, evaluate_gate
from dreambooth_lib.evaluate.paper import PAPER_REFERENCE
from dreambooth_lib.evaluate.prompts import clip_t_text, eval_templates, render_prompt
from dreambooth_lib.evaluate.report import METRICS, render_report

if TYPE_CHECKING:
    from dreambooth_lib.evaluate.scores import Scorer

PRES_DIR = "_pres"
BASE_DIR = "_base"
METRIC_KEYS = tuple(key for key, _, _ in METRICS)


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
    evaluators: dict[str, str] = Field(
        default_factory=dict, description="what scored: each evaluator's label, else its model id or path"
    )
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


@dataclass(frozen=True)
class EvalPrompts:
    """The evaluated prompts, each as its template, the prompt sampled, the CLIP-T text and its image folder."""

    templates: list[str]
    prompts: list[str]
    clip_t_texts: list[str]
    slugs: list[str]

    @classmethod
    def of(cls, config: EvalConfig, live: bool, identifier: str, class_noun: str) -> EvalPrompts:
        from dreambooth_lib.generate import unique_slugs

        templates = eval_templates(config, live)
        prompts = [render_prompt(t, identifier, class_noun) for t in templates]
        texts = [clip_t_text(t, class_noun) for t in templates]
        return cls(templates, prompts, texts, unique_slugs(prompts))

    def labels(self, i: int) -> dict[str, str]:
        return {"template": self.templates[i], "prompt": self.prompts[i], "clip_t_text": self.clip_t_texts[i]}


# --- inputs ----------------------------------------------------------------------------------------------------


def real_image_uris(real_images: str) -> list[str]:
    files = [f for f in storage.list_files(real_images, recursive=False) if f.lower().endswith(".png")]
    if not files:
        raise IngestError(
            f"{real_images}: no .png images; pass the output folder of the ingest step (NN.png)"
        )
    return files


def _lora_base(model: str, allow_pickle: bool, base_model: str | None) -> str | None:
    """The base a LoRA artifact applies to (base_model, else the one our marker names; a diffusers LoRA folder
    has no marker and needs base_model); None for a full model."""
    from dreambooth_lib.models import is_lora_dir, lora_base_model, resolve_model_dir

    local = resolve_model_dir(model, allow_pickle=allow_pickle)
    return lora_base_model(local, model, base_model) if is_lora_dir(local) else None


def _base_models(
    model: str, base_model: str | None, config: EvalConfig, allow_pickle: bool
) -> tuple[str | None, str | None]:
    """(the base model recorded and, with gate.compare_to_base, evaluated; the base model hashed into the
    digests). Refuses compare_to_base without a known base before anything is loaded."""
    lora_base = _lora_base(model, allow_pickle, base_model)
    compare_base = base_model or lora_base
    if config.gate.compare_to_base and compare_base is None:
        raise ConfigError(
            "eval.gate.compare_to_base is set but no base model is known; pass base_model (--base-model) "
            "or evaluate a LoRA artifact (its dreambooth_lora.json names the base)"
        )
    # the base is hashed only when it shaped the numbers (a LoRA's base, or the comparison): hashing a multi-GB
    # base model just to record it would cost more than a short evaluation
    hashed_base = compare_base if lora_base is not None or config.gate.compare_to_base else None
    return compare_base, hashed_base


def _notes(config: EvalConfig, templates: list[str], n_real_images: int) -> list[str]:
    """Why a number in metrics.json is null or means less than it seems, known before anything is sampled."""
    notes = []
    if not all("{0}" in t for t in templates):
        notes.append("some prompt templates lack {0}: those images do not show the identifier to the model")
    if config.lpips_weights is None:
        notes.append(
            "DIV is null: eval.lpips_weights is not set (convert the published LPIPS weights with "
            "dreambooth_lib.evaluate.lpips.convert_lpips_checkpoint and point eval.lpips_weights at the file)"
        )
    if n_real_images < 2:
        notes.append("one real image: the real-image reference (self-pairs excluded) is null")
    if config.pres_images == 0:
        notes.append("PRES is null: eval.pres_images is 0")
    if config.lpips_weights is not None and config.images_per_prompt < 2:
        notes.append("DIV is null: it needs images_per_prompt >= 2 (pairs of images of one prompt)")
    return notes


def evaluator_label_uri(uri: str) -> str:
    """Where an evaluator's label is: `<stem>.evaluator.json` beside a weights file, else inside its folder."""
    if uri.endswith(".safetensors"):
        return f"{uri.rsplit('.', 1)[0]}.{EVALUATOR_LABEL_NAME}"
    return storage.join(uri, EVALUATOR_LABEL_NAME)


def evaluator_label(uri: str) -> str:
    """What an evaluator is: the "evaluator" of its label (inside its folder, or `<stem>.evaluator.json` beside a
    weights file), so that stand-ins (the toy world's, the tests') say so in the report; else its model id or path."""
    label = evaluator_label_uri(uri)  # a hub id's is a relative path that is not there
    if storage.exists(label):
        return str(storage.read_json(label).get("evaluator") or uri)
    return uri


@dataclass
class Evaluators:
    """The loaded evaluator models: DINO, CLIP and (when weights are given) LPIPS, with the LPIPS digest."""

    dino: Any
    clip: Any
    lpips: Any | None
    lpips_digest: str | None
    device: str
    labels: dict[str, str]  # what each one is, for the report: its label, else its model id or path

    @classmethod
    def load(
        cls, dino_model: str, clip_model: str, lpips_weights: str | None, device: str, allow_pickle: bool
    ) -> Evaluators:
        from dreambooth_lib.evaluate.embedders import clip_embedder, dino_embedder

        dino = dino_embedder(dino_model, device, allow_pickle)
        clip = clip_embedder(clip_model, device, allow_pickle)
        lpips_model, lpips_digest = None, None
        if lpips_weights is not None:
            from dreambooth_lib.evaluate.lpips import load_lpips

            lpips_model, lpips_digest = load_lpips(lpips_weights)
            lpips_model.to(device)
        named = {"dino": dino_model, "clip": clip_model, "lpips": lpips_weights}
        labels = {k: evaluator_label(v) for k, v in named.items() if v is not None}
        return cls(dino, clip, lpips_model, lpips_digest, device, labels)

    def scorer(self, real_uris: list[str]) -> Scorer:
        """A scorer against these real images (their embeddings made once)."""
        from dreambooth_lib.evaluate.samples import read_image
        from dreambooth_lib.evaluate.scores import Scorer

        real = [read_image(u) for u in real_uris]
        return Scorer.for_real_images(real, self.dino, self.clip, self.lpips, self.device)


# --- the step --------------------------------------------------------------------------------------------------


@contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    tic = time.perf_counter()
    yield
    times[name] = time.perf_counter() - tic


def _evaluate_base(
    base: str,
    prompts: EvalPrompts,
    scorer: Scorer,
    config: EvalConfig,
    device: str,
    allow_pickle: bool,
    resolution: int,
    out: str,
) -> dict[str, Any]:
    """gate.compare_to_base: the base model sampled on the same identifier prompts at the same seeds and
    resolution, saved under images/_base/ and scored: how much of the subject the prompt alone gives."""
    from dreambooth_lib.evaluate.samples import sample_model, save_images

    images = sample_model(
        base, prompts.prompts, config, device, allow_pickle=allow_pickle, resolution=resolution
    )
    paths = [
        save_images(out, f"{BASE_DIR}/{s}", g) for s, g in zip(prompts.slugs, images.groups, strict=True)
    ]
    per_prompt, overall = scorer.score_prompts(images.groups, prompts.clip_t_texts)
    rows = [{**prompts.labels(i), **scores, "images": paths[i]} for i, scores in enumerate(per_prompt)]
    return {"model": base, "metrics": overall, "per_prompt": rows}


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
    """Evaluate `model` (a diffusers folder, our LoRA folder or a diffusers LoRA folder) on the subject's ingested
    images, by the paper.

    base_model: for a LoRA artifact, the base it applies to (default: the one its dreambooth_lora.json names; a
    diffusers LoRA folder has none and needs it); with gate.compare_to_base, the model evaluated on the same
    prompts for the DINO comparison.
    prior_images: class-prior image URIs shown in the report (not scored: PRES samples the fine-tuned model).
    Returns the EvalResult also written as metrics.json.
    """
    from dreambooth_lib.evaluate.samples import sample_model, save_images
    from dreambooth_lib.models import resolve_device

    t0 = time.perf_counter()
    out = str(out)
    times: dict[str, float] = {}
    prompts = EvalPrompts.of(config, live, identifier, class_noun)
    real_uris = real_image_uris(real_images)
    compare_base, hashed_base = _base_models(model, base_model, config, allow_pickle)
    device = resolve_device(config.device)

    # evaluators first: a wrong dino_model / clip_model / lpips_weights fails before minutes of sampling
    with _timed(times, "load_evaluators"):
        evaluators = Evaluators.load(
            config.dino_model, config.clip_model, config.lpips_weights, device, allow_pickle
        )
        scorer, lpips_digest = evaluators.scorer(real_uris), evaluators.lpips_digest
    with _timed(times, "sample"):
        images = sample_model(
            model,
            prompts.prompts,
            config,
            device,
            allow_pickle=allow_pickle,
            base_model=base_model,
            class_prompt=f"a {class_noun}",  # PRES: the fine-tuned model's own images of the plain class
        )
        image_paths = [save_images(out, s, g) for s, g in zip(prompts.slugs, images.groups, strict=True)]
        pres_paths = save_images(out, PRES_DIR, images.class_images)
    base_section = None
    if config.gate.compare_to_base:
        with _timed(times, "base"):
            base_section = _evaluate_base(
                compare_base, prompts, scorer, config, device, allow_pickle, images.resolution, out
            )
    with _timed(times, "score"):
        per_prompt, overall = scorer.score_prompts(images.groups, prompts.clip_t_texts)
        overall["pres"] = scorer.pres(images.class_images)
    metrics = {k: overall.get(k) for k in METRIC_KEYS}

    result = EvalResult(
        model=model,
        base_model=compare_base,
        subject=subject_name,
        identifier=identifier,
        class_noun=class_noun,
        live=live,
        metrics=metrics,
        per_prompt=[
            PromptMetrics(**prompts.labels(i), **scores, images=image_paths[i])
            for i, scores in enumerate(per_prompt)
        ],
        reference={**scorer.real_reference(), "n_images": len(real_uris), "paper": PAPER_REFERENCE},
        base=base_section,
        gate=evaluate_gate(metrics, config.gate, base_section["metrics"] if base_section else None),
        notes=_notes(config, prompts.templates, len(real_uris)),
        evaluators=evaluators.labels,
        config=config.model_dump(mode="json"),
        resolution=images.resolution,
        digests=_digests(model, hashed_base, config, lpips_digest, allow_pickle),
        counts={
            "real_images": len(real_uris),
            "prompts": len(prompts.prompts),
            "images_per_prompt": config.images_per_prompt,
            "generated": sum(len(g) for g in images.groups),
            "pres_images": len(pres_paths),
            "base_generated": sum(len(p["images"]) for p in (base_section or {}).get("per_prompt", [])),
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


def _digests(
    model: str, hashed_base: str | None, config: EvalConfig, lpips_digest: str | None, allow_pickle: bool
) -> dict[str, str | None]:
    """Content digests of every model that shaped the numbers: what makes two evaluations comparable."""
    from dreambooth_lib.models import model_digest

    return {
        "model": model_digest(model, allow_pickle=allow_pickle),
        "base_model": model_digest(hashed_base, allow_pickle=allow_pickle) if hashed_base else None,
        "dino": model_digest(config.dino_model, allow_pickle=allow_pickle),
        "clip": model_digest(config.clip_model, allow_pickle=allow_pickle),
        "lpips": lpips_digest,
    }


# --- the report and metrics.json -------------------------------------------------------------------------------


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
        evaluators=result.evaluators,
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


def load_metrics(out: str) -> EvalResult:
    """The EvalResult of an evaluation folder (its metrics.json)."""
    uri = storage.join(str(out), METRICS_NAME)
    if not storage.exists(uri):
        raise StorageError(f"{uri}: not found; run the evaluate step into {out} first")
    return EvalResult.model_validate(storage.read_json(uri))
