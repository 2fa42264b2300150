"""lineage.json: where a registered version came from, every input with its digest, the configs, the code version."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import dreambooth_lib

if TYPE_CHECKING:
    from dreambooth_lib.registry.store import Registration


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), so equal content has one digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def lineage_record(
    entry: dict,
    registration: Registration,
    *,
    model_digest: str,
    report_digest: str | None,
    samples: list[dict],
) -> dict:
    """The lineage.json of the claimed `entry`; `samples` as copied: {source_uri, sha256, path}."""
    r = registration
    return {
        "subject": r.subject,
        "version": entry["version"],
        "created": entry["created"],
        "code_version": dreambooth_lib.__version__,
        "model": {
            "source_uri": r.model_dir,
            "digest": model_digest,
            "uri": entry["model_uri"],
            "mode": entry["mode"],
        },
        "base_model": {"uri": r.base_model, "digest": r.base_model_digest},
        "identifier": r.identifier,
        "class_noun": r.class_noun,
        "report_html": {"source_uri": r.report_html, "sha256": report_digest} if r.report_html else None,
        "samples": samples,
        "metrics": r.metrics,
        "reference": r.reference,
        "gate": r.gate,
        "train_config": r.train_config,
        # who or what is pictured and, for a person, the consent record (ingest checked it before any training)
        "subject_record": (r.data_manifest or {}).get("subject"),
        "data_manifest": {"sha256": json_digest(r.data_manifest), "content": r.data_manifest}
        if r.data_manifest is not None
        else None,
        "inputs": r.lineage,
    }
