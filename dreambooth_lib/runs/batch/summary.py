"""The batch's tables: the summary of every subject (Markdown, HTML, summary.json) and one subject's status."""

from __future__ import annotations

import html
import json
from typing import Any

from dreambooth_lib.runs.batch.status import SubjectStatus

SUMMARY_COLUMNS = (
    "subject",
    "class",
    "identifier",
    "status",
    "DINO",
    "CLIP-I",
    "CLIP-T",
    "step",
    "gate",
    "model",
    "report",
)
# the fields of a subject's status shown on its own page (the subject task's `status` artifact)
STATUS_FIELDS = (
    "identifier",
    "class_noun",
    "error",
    "model_uri",
    "metrics",
    "gate",
    "report_html",
    "registered",
    "chosen_step",
)


def summary_title(statuses: list[SubjectStatus], job_id: str = "") -> str:
    ok = sum(1 for s in statuses if s.ok)
    label = f"Batch {job_id}" if job_id else "Batch"
    return f"{label}: {ok} of {len(statuses)} subjects succeeded"


def summary_rows(statuses: list[SubjectStatus]) -> list[list[str]]:
    """One row per status, sorted by subject (then manifest index), cells as in SUMMARY_COLUMNS."""
    ordered = sorted(statuses, key=lambda s: (s.subject, s.entry if s.entry is not None else -1))
    return [
        [
            s.subject,
            s.class_noun or "",
            s.identifier or "",
            s.status + (f" ({s.error})" if s.error else ""),
            _metric(s, "dino"),
            _metric(s, "clip_i"),
            _metric(s, "clip_t"),
            str(s.chosen_step) if s.chosen_step is not None else "",
            _gate(s),
            (s.registered or {}).get("uri") or s.model_uri or "",
            s.report_html or "",
        ]
        for s in ordered
    ]


def render_summary(statuses: list[SubjectStatus], job_id: str = "", run_error: str = "") -> tuple[str, str]:
    """(Markdown, HTML) of the batch: per subject its class, identifier, status, metrics, gate and links."""
    title = summary_title(statuses, job_id)
    rows = summary_rows(statuses)
    md = [f"# {title}", "", "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    md += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    note = packing_note(statuses)
    if note:
        md += ["", note]
    if run_error:
        md += ["", f"Run error: {run_error}"]
    markdown = "\n".join(md) + "\n"
    cells = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
        "<table border='1' cellpadding='4'><tr>"
        + "".join(f"<th>{h}</th>" for h in SUMMARY_COLUMNS)
        + f"</tr>{cells}</table>"
        + (f"<p>{html.escape(note)}</p>" if note else "")
        + (f"<p>Run error: {html.escape(run_error)}</p>" if run_error else "")
    )
    return markdown, page


def packing_note(statuses: list[SubjectStatus]) -> str:
    """A line naming the subjects whose LoRA was trained in a pack ('' when none was)."""
    names = sorted(s.subject for s in statuses if s.packed)
    return f"Trained in packs (several LoRA subjects per UNet batch): {', '.join(names)}" if names else ""


def summary_record(statuses: list[SubjectStatus], job_id: str = "") -> dict[str, Any]:
    """summary.json: the title and each status keyed by subject (a repeated name gets '#<manifest index>')."""
    records: dict[str, Any] = {}
    for s in statuses:
        key = s.subject if s.subject not in records else f"{s.subject}#{s.entry}"
        records[key] = s.model_dump(mode="json", exclude_none=True)
    return {"title": summary_title(statuses, job_id), "subjects": records}


def render_status(status: SubjectStatus) -> str:
    """One subject's status as Markdown (the subject task's `status` artifact)."""
    lines = [f"# {status.subject}: {status.status}", ""]
    for key in STATUS_FIELDS:
        value = getattr(status, key)
        if value is not None:
            lines.append(f"- **{key}**: `{json.dumps(value, default=str)}`")
    return "\n".join(lines) + "\n"


def _metric(s: SubjectStatus, key: str) -> str:
    value = (s.metrics or {}).get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""


def _gate(s: SubjectStatus) -> str:
    if not s.gate:
        return ""
    return "passed" if s.gate.get("passed") else "failed: " + "; ".join(s.gate.get("reasons", []))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _html_cell(text: str) -> str:
    """Escaped text; a link (gs://, http(s)://, a path to report.html) is made clickable."""
    escaped = html.escape(text)
    if text.startswith(("http://", "https://")) or text.endswith(".html"):
        return f"<a href='{escaped}'>{escaped}</a>"
    return escaped
