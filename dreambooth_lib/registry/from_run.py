"""Registering a finished run: the model of a train folder with the evaluation and the data it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dreambooth_lib import storage
from dreambooth_lib.artifacts import MODEL_FOLDER, REPORT_NAME, SUMMARY_NAME
from dreambooth_lib.errors import ConfigError, DreamboothError, StorageError
from dreambooth_lib.registry.backends import open_registry
from dreambooth_lib.registry.entries import RegisteredModel
from dreambooth_lib.registry.layout import MAX_CARD_SAMPLES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register_from_dirs(
    registry_uri: str,
    *,
    subject: Any,
    train_dir: str,
    eval_dir: str | None,
    ingest_dir: str,
    class_noun: str | None = None,
    require_gate: bool = True,
    run_config: dict | None = None,
    backend: str = "file",
) -> RegisteredModel:
    """Register the model of a train folder with the evaluation and data it came from.

    Reads train_dir/train_summary.json (identifier, class_noun, base_model, base_model_digest, config,
    model_uri), eval_dir/metrics.json (metrics, reference, gate) and ingest_dir/manifest.json. `subject` is a
    name or a Subject-like object (its .name and .class_noun are used). The weights come from train_dir/model
    when present (KFP hands the train artifact over under a new path), else from the summary's model_uri.
    Without an evaluation (eval_dir None) the model is registered as "not evaluated": require_gate refuses
    failed gates, not missing ones.
    """
    if not isinstance(subject, str):
        class_noun = class_noun or getattr(subject, "class_noun", None)
        subject = subject.name
    summary_uri = storage.join(train_dir, SUMMARY_NAME)
    summary, summary_digest = _read_train_summary(summary_uri)
    class_noun = class_noun or summary.get("class_noun")
    if not class_noun:
        raise ConfigError(f"{subject}: no class noun given and none in {summary_uri}; pass class_noun")
    evaluation = _read_evaluation(eval_dir) if eval_dir is not None else _Evaluation()
    manifest_uri = storage.join(ingest_dir, "manifest.json")
    manifest, manifest_digest = _read_json_or_none(manifest_uri)
    lineage = {
        "train_summary": {"uri": summary_uri, "sha256": summary_digest},
        "eval_metrics": {"uri": evaluation.uri, "sha256": evaluation.digest} if evaluation.uri else None,
        "ingest_manifest": {"uri": manifest_uri, "sha256": manifest_digest} if manifest is not None else None,
        "instance_images": {"uri": ingest_dir, "digest": storage.digest_prefix(ingest_dir)},
        "run_config": run_config,
    }
    reference = evaluation.reference
    return open_registry(registry_uri, backend=backend).register(
        subject=subject,
        model_dir=_model_folder(train_dir, summary),
        identifier=summary["identifier"],
        class_noun=class_noun,
        base_model=summary["base_model"],
        base_model_digest=summary.get("base_model_digest") or "",
        metrics=evaluation.metrics,
        gate=evaluation.gate,
        lineage=lineage,
        reference={k: reference.get(k) for k in ("dino", "clip_i")} if reference else None,
        report_html=evaluation.report,
        sample_grid=evaluation.samples,
        train_config=summary.get("config"),
        data_manifest=manifest,
        require_gate=require_gate,
    )


def _read_train_summary(summary_uri: str) -> tuple[dict, str]:
    """train_summary.json and its sha256; it must name the identifier and the base model."""
    summary, digest = _read_required_json(summary_uri, "register a finished training run (its train/ folder)")
    missing = [k for k in ("identifier", "base_model") if not summary.get(k)]
    if missing:
        raise DreamboothError(f"{summary_uri}: missing {', '.join(missing)}; re-run training to rewrite it")
    return summary, digest


def _model_folder(train_dir: str, summary: dict) -> str:
    """train_dir/model when present (KFP hands the train artifact over under a new path), else model_uri."""
    local_model = storage.join(train_dir, MODEL_FOLDER)
    model_dir = local_model if storage.is_dir(local_model) else summary.get("model_uri")
    if not model_dir or not storage.is_dir(model_dir):
        raise StorageError(f"{train_dir}: no model folder (model/ or the summary's model_uri {model_dir!r})")
    return model_dir


@dataclass(frozen=True)
class _Evaluation:
    """What registering takes from an evaluation folder; the defaults stand for "not evaluated"."""

    uri: str | None = None  # metrics.json
    digest: str | None = None  # its sha256
    metrics: dict | None = None
    reference: dict | None = None
    gate: dict | None = None
    report: str | None = None  # report.html, when there is one
    samples: list[str] = field(default_factory=list)


def _read_evaluation(eval_dir: str) -> _Evaluation:
    metrics_uri = storage.join(eval_dir, "metrics.json")
    doc, digest = _read_required_json(metrics_uri, "run the evaluation first or register without eval_dir")
    if not isinstance(doc.get("gate"), dict) or "passed" not in doc["gate"]:
        raise DreamboothError(f"{metrics_uri}: no gate verdict ('gate': {{'passed': ..., 'reasons': [...]}})")
    report_uri = storage.join(eval_dir, REPORT_NAME)
    return _Evaluation(
        uri=metrics_uri,
        digest=digest,
        metrics=doc.get("metrics") or {},
        reference=doc.get("reference") or {},
        gate=doc["gate"],
        report=report_uri if storage.exists(report_uri) else None,
        samples=_sample_images(eval_dir, doc),
    )


def _sample_images(eval_dir: str, metrics_doc: dict) -> list[str]:
    """Up to MAX_CARD_SAMPLES images, one per prompt first: the per-prompt lists of metrics.json, else a
    round-robin over eval_dir/images/<prompt>/ (the _pres and _base folders are not samples of this model)."""
    groups: list[list[str]] = []
    for p in metrics_doc.get("per_prompt") or []:
        images = [storage.join(eval_dir, *str(r).split("/")) for r in p.get("images") or []]
        if images:
            groups.append(images)
    if not groups:
        by_folder: dict[str, list[str]] = {}
        images_root = storage.join(eval_dir, "images")
        for f in storage.list_files(images_root):
            rel = storage.relative(f, images_root)
            if rel.lower().endswith(IMAGE_SUFFIXES) and not rel.startswith("_"):
                by_folder.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else "", []).append(f)
        groups = [by_folder[k] for k in sorted(by_folder)]
    picked: list[str] = []
    for round_ in range(max((len(g) for g in groups), default=0)):
        picked += [g[round_] for g in groups if round_ < len(g)]
    return picked[:MAX_CARD_SAMPLES]


def _read_required_json(uri: str, fix: str) -> tuple[Any, str]:
    doc, digest = _read_json_or_none(uri)
    if doc is None:
        raise DreamboothError(f"{uri}: not found; {fix}")
    return doc, digest


def _read_json_or_none(uri: str) -> tuple[Any, str | None]:
    if not storage.exists(uri):
        return None, None
    data = storage.read_bytes(uri)
    try:
        return json.loads(data), storage.sha256_bytes(data)
    except json.JSONDecodeError as err:
        raise StorageError(f"{uri}: not valid JSON ({err})") from None
