"""model_card.md: Hugging Face model-card front matter and the sections a user of a registered model needs."""

from __future__ import annotations

import json
from typing import Any

import yaml

import dreambooth_lib
from dreambooth_lib import storage
from dreambooth_lib.artifacts import LINEAGE_NAME, REPORT_NAME
from dreambooth_lib.evaluate.report import METRIC_TABLE_COLUMNS, metric_table_rows
from dreambooth_lib.registry.lineage import json_digest
from dreambooth_lib.registry.model_folder import pipeline_class

DEFAULT_LICENSE_NOTE = (
    "The weights are derived from the base model and carry its license. Subject photos: DreamBench photos "
    "(google/dreambooth dataset) are CC BY 4.0, with images from Unsplash under the Unsplash License or "
    "taken by the paper's authors (see the dataset's references_and_licenses.txt); photos of your own are "
    "under your terms."
)


def render_model_card(
    entry: dict,
    *,
    metrics: dict | None,
    reference: dict,
    gate: dict | None,
    samples: list[str],
    train_config: dict | None,
    data_manifest: dict | None,
    license_note: str,
    model_digest: str,
    family: str | None = None,
) -> str:
    """The card of the claimed `entry`; `samples` are version-relative paths, `family` the base model's family
    (it picks the diffusers class the card loads the model with; None: DiffusionPipeline)."""
    lines = _front_matter(entry, license_note, model_digest)
    lines += _identity_section(entry)
    lines += _usage_section(entry, family)
    lines += _metrics_section(metrics, reference)
    lines += _gate_lines(gate)
    if entry.get("report_uri"):
        lines += [f"Full report: [{REPORT_NAME}]({REPORT_NAME}).", ""]
    lines += _samples_section(samples)
    lines += _training_section(train_config)
    lines += _data_section(data_manifest)
    lines += _subject_section((data_manifest or {}).get("subject"))
    lines += ["## License", "", license_note, ""]
    lines += [
        "## Lineage",
        "",
        f"Every input URI and digest, the configs and the code version ({_code(dreambooth_lib.__version__)}) "
        f"are in [{LINEAGE_NAME}]({LINEAGE_NAME}). Registered {entry['created']}.",
        "",
    ]
    return "\n".join(lines)


def _code(text: Any) -> str:
    """An inline code span; backticks inside would end it early."""
    return "`" + str(text).replace("`", "'") + "`"


def _prompt(entry: dict) -> str:
    return f"a {entry['identifier']} {entry['class_noun']}"


def _front_matter(entry: dict, license_note: str, model_digest: str) -> list[str]:
    front = {
        "base_model": entry["base_model"],
        "library_name": "diffusers",
        "license": "other",
        "license_note": license_note,
        "instance_prompt": _prompt(entry),
        "tags": [
            "text-to-image",
            "diffusers",
            "dreambooth",
            "lora" if entry["mode"] == "lora" else "full-fine-tune",
        ],
        "dreambooth": {
            "subject": entry["subject"],
            "version": entry["version"],
            "identifier": entry["identifier"],
            "class_noun": entry["class_noun"],
            "base_model_digest": entry["base_model_digest"],
            "model_digest": model_digest,
            "created": entry["created"],
            "gate_passed": entry.get("gate_passed"),
        },
    }
    return ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def _identity_section(entry: dict) -> list[str]:
    lora = entry["mode"] == "lora"
    base_model = entry["base_model"]
    return [
        f"# {entry['subject']} v{entry['version']}: DreamBooth {'LoRA' if lora else 'fine-tune'} of "
        f"{_code(base_model)}",
        "",
        "## Identifier and class",
        "",
        f"- identifier: {_code(entry['identifier'])} (a rare token bound to this subject)",
        f"- class: {_code(entry['class_noun'])}",
        f"- base model: {_code(base_model)} (digest {_code(entry['base_model_digest'] or 'unknown')})",
        f"- weights: {_code(entry['model_uri'])} ({'LoRA adapter' if lora else 'full diffusers pipeline'})",
        "",
    ]


def _usage_section(entry: dict, family: str | None) -> list[str]:
    """How to prompt, and code that runs as written: with our loader, and with diffusers alone."""
    prompt = _prompt(entry)
    example = json.dumps(prompt + " on the beach")
    return [
        "## How to prompt",
        "",
        f"Put the identifier before the class noun: {_code(prompt)}, e.g. {_code(prompt + ' on the beach')}.",
        "",
        "```python",
        "from dreambooth_lib.models import load_pipeline  # local folders and gs:// prefixes",
        "",
        f"pipe = load_pipeline({json.dumps(entry['model_uri'])})",
        f"image = pipe({example}, num_inference_steps=25).images[0]",
        "```",
        "",
        *_diffusers_usage(entry, family, example),
    ]


def _diffusers_usage(entry: dict, family: str | None, example: str) -> list[str]:
    """The same with diffusers alone. from_pretrained and load_lora_weights read local folders and hub ids,
    not gs:// prefixes, so those are copied to a local folder first."""
    model_path, copies = _readable_by_diffusers(entry["model_uri"], "model")
    pipe_class = pipeline_class(family)
    if entry["mode"] == "lora":
        base_path, base_copies = _readable_by_diffusers(entry["base_model"], "base")
        copies = base_copies + copies
        load = [
            f"pipe = {pipe_class}.from_pretrained({json.dumps(base_path)})",
            f"pipe.load_lora_weights({json.dumps(model_path)})",
        ]
    else:
        load = [f"pipe = {pipe_class}.from_pretrained({json.dumps(model_path)})"]
    lines = ["With diffusers alone:", ""]
    if copies:
        lines += ["```bash", *copies, "```", ""]
    return lines + [
        "```python",
        f"from diffusers import {pipe_class}",
        "",
        *load,
        f"image = pipe({example}, num_inference_steps=25).images[0]",
        "```",
        "",
    ]


def _readable_by_diffusers(uri: str, local_name: str) -> tuple[str, list[str]]:
    """What to pass diffusers for `uri`, and the commands that make it: a hub id or a local folder as is; a
    gs:// prefix copied to ./<local_name> first."""
    if not storage.is_gcs(uri):
        return uri, []
    return f"./{local_name}", [f"gcloud storage cp -r {uri.rstrip('/')} ./{local_name}"]


def _markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _metrics_section(metrics: dict | None, reference: dict) -> list[str]:
    if metrics is None:
        return ["## Metrics", "", "Not evaluated.", ""]
    lines = ["## Metrics", "", _markdown_row(METRIC_TABLE_COLUMNS), "|---" * len(METRIC_TABLE_COLUMNS) + "|"]
    for _, label, better, cells in metric_table_rows(metrics, reference):
        lines.append(_markdown_row([label, better, *cells]))
    return lines + [
        "",
        "Real images (ceiling): the subject's real photos scored against each other. "
        "Paper: Ruiz et al. 2023, Table 1.",
        "",
    ]


def _gate_lines(gate: dict | None) -> list[str]:
    if gate is None:
        return ["Quality gate: not evaluated.", ""]
    verdict = "passed" if gate.get("passed") else "failed (registered with require_gate=False)"
    return [f"Quality gate: {verdict}.", *(f"- {r}" for r in gate.get("reasons") or []), ""]


def _samples_section(samples: list[str]) -> list[str]:
    if not samples:
        return []
    return ["## Samples", "", *(f"![sample {i}]({path})" for i, path in enumerate(samples)), ""]


def _training_section(train_config: dict | None) -> list[str]:
    if not train_config:
        return ["## Training configuration", "", "Not recorded.", ""]
    return [
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump(train_config, sort_keys=False).rstrip(),
        "```",
        "",
    ]


def _data_section(data_manifest: dict | None) -> list[str]:
    if data_manifest is None:
        return ["## Data", "", "No data manifest was recorded.", ""]
    lines = ["## Data", "", f"Data manifest sha256 (canonical JSON): {_code(json_digest(data_manifest))}", ""]
    rows = _manifest_rows(data_manifest)
    if rows:
        lines += [
            "| file | sha256 |",
            "|---|---|",
            *(f"| {_code(name)} | {_code(digest)} |" for name, digest in rows),
            "",
        ]
    return lines


def _subject_section(subject: dict | None) -> list[str]:
    """Who or what is pictured, as ingest recorded it: the kind, a person's consent record, the face check."""
    if not subject:
        return []
    lines = ["## Subject and consent", "", f"- kind: {_code(subject.get('kind'))}"]
    consent = subject.get("consent")
    if consent:
        lines += [
            f"- consent given by {_code(consent['given_by'])} on {_code(consent['date'])}; record: "
            f"{_code(consent['reference'])}"
        ]
    elif subject.get("kind") == "person":
        lines += ["- consent: **none recorded**"]
    lines += [f"- faces in the photos: {subject.get('faces')}", ""]
    return lines


def _manifest_rows(manifest: dict) -> list[tuple[str, str]]:
    """(file, sha256) pairs of an ingest manifest, whichever list of file records it holds."""
    rows = []
    for value in manifest.values():
        if not isinstance(value, list):
            continue
        for item in value:
            if not isinstance(item, dict):
                continue
            name = next(
                (str(item[k]) for k in ("name", "file", "path", "output", "uri", "source") if k in item), None
            )
            digest = next(
                (str(item[k]) for k in ("sha256", "digest", "output_sha256", "source_sha256") if k in item),
                None,
            )
            if name and digest:
                rows.append((name, digest))
    return rows
