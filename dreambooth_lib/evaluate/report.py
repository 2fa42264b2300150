"""The visual report of one personalized model: a single self-contained report.html.

Everything the page shows is inside the file: images are downscaled thumbnails embedded as data URIs, the
CSS is inline, and a Content-Security-Policy forbids any other source, so the page renders the same in the
Kubeflow UI's iframe, attached to an e-mail, or offline. Every piece of text is HTML-escaped (subject names,
prompts and gate reasons come from users). Elements that tests and readers look for have stable ids and
classes: `#inputs`, `#prior`, `table.grid#grid`, `table#metrics` (rows `#metric-<key>`), `#gate` (class
`passed` / `failed`), and when the training summary is known `#training` (an inline SVG loss curve,
`polyline#loss-curve`, one point per logged step, and `table#training-facts`); with train.select,
`#selection` (`polyline#probe-<metric>` per metric, `line#chosen-step`, `table#probe-table`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from dreambooth_lib import storage
from dreambooth_lib.errors import StorageError
from dreambooth_lib.evaluate.paper import PAPER_REAL_IMAGES, PAPER_SD_DREAMBOOTH

THUMBNAIL_SIDE = 256
MAX_PRIOR_SHOWN = 8
JPEG_QUALITY = 85

# (key in `metrics`, label, what is better). PRES measures how much of the subject leaks into plain class
# prompts (the paper's prior-preservation metric), so lower is better there; the others are similarities or
# diversity.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("dino", "DINO", "higher"),
    ("clip_i", "CLIP-I", "higher"),
    ("clip_t", "CLIP-T", "higher"),
    ("pres", "PRES", "lower"),
    ("div", "DIV", "higher"),
)
# The metric table's columns, in the HTML report and the registry's model card alike
METRIC_TABLE_COLUMNS = (
    "metric",
    "better",
    "this model",
    "real images (ceiling)",
    "paper: DreamBooth (SD)",
    "paper: real images",
)
MISSING = "—"
DETAILS_INLINE_CHARS = 120

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;color:#1d1d1f}
h1{font-size:1.5rem;margin:0 0 .25rem}
h2{font-size:1.15rem;margin:1.75rem 0 .5rem;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 1rem}
code{background:#f3f3f3;padding:.1rem .3rem;border-radius:3px}
.strip{display:flex;flex-wrap:wrap;gap:.5rem}
.strip img,.grid img{border-radius:4px;display:block;max-width:100%}
table{border-collapse:collapse}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.grid td{padding:.2rem}
table.grid th.prompt{max-width:16rem;font-weight:normal}
#gate{padding:.6rem 1rem;border-radius:6px;margin:1rem 0}
#gate.passed{background:#e6f4ea;border:1px solid #34a853}
#gate.failed{background:#fce8e6;border:1px solid #d93025}
pre{margin:.3rem 0;font-size:.8rem;white-space:pre-wrap}
.verdict{font-weight:bold}
.note{color:#666;font-size:.9rem}
"""
# No script, no remote fetch: only inline styles and data: images may load.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def thumbnail_data_uri(uri: str, side: int = THUMBNAIL_SIDE) -> tuple[str, int, int]:
    """(data URI, width, height) of the image downscaled to fit `side`: JPEG when opaque, PNG with alpha."""
    from PIL import Image, ImageOps

    data = storage.read_bytes(uri)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)  # multi-frame files (MPO photos, GIF): the first frame is the photo
            img = ImageOps.exif_transpose(img)
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
            has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
            buf = io.BytesIO()
            if has_alpha:
                img.convert("RGBA").save(buf, format="PNG", optimize=True)
                mime = "image/png"
            else:
                img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
                mime = "image/jpeg"
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise StorageError(f"{uri}: not a readable image ({err}); replace or remove the file") from None
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", width, height


def _img(uri: str, alt: str) -> str:
    src, width, height = thumbnail_data_uri(uri)
    return f'<img src="{src}" width="{width}" height="{height}" alt="{_esc(alt)}" title="{_esc(uri)}">'


def format_value(value: Any) -> str:
    """A metric cell: three decimals for numbers, an em dash for a metric that was not computed."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    return str(value)


PLOT_W, PLOT_H, PLOT_PAD = 480, 160, 36
PROBE_COLORS = {
    "dino": "#1a73e8",
    "clip_i": "#34a853",
    "clip_t": "#fbbc04",
    "pres": "#ea4335",
    "div": "#9334e6",
}


def _line_plot(
    lines: dict[str, tuple[str, list[tuple[int, float]]]], label: str, x_title: str, mark_x: int | None = None
) -> str:
    """Inline SVG of step-indexed lines on one scale: `lines` maps each polyline's id to (colour, points);
    `mark_x` draws a dashed vertical line (id `chosen-step`) at that step."""
    points = [p for _, pts in lines.values() for p in pts]
    s0, s1 = min(s for s, _ in points), max(s for s, _ in points)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    w, h, pad = PLOT_W, PLOT_H, PLOT_PAD

    def x(step: float) -> float:
        return pad + (w - 2 * pad) * ((step - s0) / (s1 - s0) if s1 > s0 else 0.5)

    def y(value: float) -> float:
        return h - pad + (pad * 2 - h) * ((value - lo) / (hi - lo) if hi > lo else 0.5)

    svg = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{_esc(label)}">',
        f'<rect x="{pad}" y="{pad / 2}" width="{w - 2 * pad}" height="{h - 1.5 * pad}" fill="none" stroke="#ddd"/>',
    ]
    for line_id, (color, pts) in lines.items():
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
        svg.append(
            f'<polyline id="{line_id}" fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'
        )
    if mark_x is not None:
        svg.append(
            f'<line id="chosen-step" x1="{x(mark_x):.1f}" x2="{x(mark_x):.1f}" y1="{pad / 2}" y2="{h - pad}" '
            f'stroke="#000" stroke-dasharray="4 3"><title>chosen step {mark_x}</title></line>'
        )
    svg += [
        f'<text x="{pad - 4}" y="{y(hi) + 4:.1f}" text-anchor="end" font-size="10">{hi:.4g}</text>',
        f'<text x="{pad - 4}" y="{y(lo) + 4:.1f}" text-anchor="end" font-size="10">{lo:.4g}</text>',
        f'<text x="{x(s0):.1f}" y="{h - pad + 14}" text-anchor="middle" font-size="10">{s0}</text>',
        f'<text x="{x(s1):.1f}" y="{h - pad + 14}" text-anchor="middle" font-size="10">{s1}</text>',
        f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle" font-size="10">{_esc(x_title)}</text></svg>',
    ]
    return "".join(svg)


def _selection_section(selection: dict) -> str:
    """train.select's probes: one line per metric over the probed steps, the chosen step marked, and a table."""
    probes, chosen = selection.get("probes") or [], selection.get("chosen_step")
    lines = {
        f"probe-{m}": (color, [(p["step"], p[m]) for p in probes if p.get(m) is not None])
        for m, color in PROBE_COLORS.items()
    }
    lines = {k: v for k, v in lines.items() if v[1]}
    if not lines:
        return ""
    legend = " ".join(
        f'<span style="color:{PROBE_COLORS[k.removeprefix("probe-")]}">&#9632; {_esc(k.removeprefix("probe-"))}</span>'
        for k in lines
    )
    stopped = selection.get("stopped_early_at")
    caption = f"chosen step {chosen}" + (f"; stopped early at step {stopped}" if stopped is not None else "")
    metrics = [m for m in PROBE_COLORS if any(p.get(m) is not None for p in probes)]
    head = "".join(f"<th>{_esc(m)}</th>" for m in ["step", *metrics])
    rows = "".join(
        f"<tr{' class=chosen' if p['step'] == chosen else ''}><td>{p['step']}</td>"
        + "".join(f"<td>{format_value(p.get(m))}</td>" for m in metrics)
        + "</tr>"
        for p in probes
    )
    return (
        f'<h3>Checkpoint probes</h3><div id="selection"><p class="note">{_esc(caption)} '
        f"(step 0: the untrained model, the rule's reference). {legend}</p>"
        + _line_plot(lines, "probe metrics by step", "step (probe scores)", mark_x=chosen)
        + f'<table id="probe-table"><tr>{head}</tr>{rows}</table></div>'
    )


def _training_section(training: dict) -> str:
    """The loss curve (mean loss between log steps, as train.run records it) as inline SVG, train.select's probe
    curves when it ran, and the run's facts."""
    losses = [(int(s), float(v)) for s, v in training.get("losses") or [] if v == v]  # NaN dropped
    parts = ['<h2>Training</h2><div id="training">']
    if losses:
        parts.append(
            _line_plot(
                {"loss-curve": ("#1a73e8", losses)},
                "training loss",
                "step (mean loss since the previous point)",
            )
        )
    if training.get("selection"):
        parts.append(_selection_section(training["selection"]))
    facts = [
        ("mode", training.get("mode")),
        ("steps", training.get("steps")),
        ("precision", training.get("precision")),
        ("device", training.get("device")),
        ("s/step", f"{training['s_per_step']:.3f}" if training.get("s_per_step") is not None else None),
        (
            "wall time s",
            f"{training['wall_time_s']:.1f}" if training.get("wall_time_s") is not None else None,
        ),
        (
            "peak memory GiB",
            f"{training['peak_memory_bytes'] / 2**30:.2f}" if training.get("peak_memory_bytes") else None,
        ),
        ("resumed from step", training.get("resumed_from")),
        ("exported step (train.select)", (training.get("selection") or {}).get("chosen_step")),
        (
            "subject / prior images",
            f"{training.get('num_instance_images')} / {training.get('num_prior_images')}",
        ),
    ]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts if v is not None)
    parts.append(f'<table id="training-facts">{rows}</table></div>')
    return "".join(parts)


def metric_table_rows(metrics: dict, reference: dict) -> list[tuple[str, str, str, list[str]]]:
    """(key, label, what is better, the formatted value cells) of each metric, cells in METRIC_TABLE_COLUMNS'
    order: this model, the real images against each other, the paper's DreamBooth (SD), the paper's real images."""
    rows = []
    for key, label, better in METRICS:
        values = [
            metrics.get(key),
            reference.get(key),
            PAPER_SD_DREAMBOOTH.get(key),
            PAPER_REAL_IMAGES.get(key),
        ]
        rows.append((key, label, better, [format_value(v) for v in values]))
    return rows


def _metrics_table(metrics: dict, reference: dict) -> str:
    rows = ["<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in METRIC_TABLE_COLUMNS) + "</tr>"]
    for key, label, better, cells in metric_table_rows(metrics, reference):
        tds = "".join(f'<td class="num">{_esc(cell)}</td>' for cell in cells)
        rows.append(f'<tr id="metric-{key}"><th scope="row">{label}</th><td>{better}</td>{tds}</tr>')
    return '<table id="metrics" class="metrics">' + "".join(rows) + "</table>"


def _evaluators_note(evaluators: dict[str, str]) -> str:
    names = {"dino": "DINO", "clip": "CLIP", "lpips": "LPIPS"}
    used = "; ".join(f"{names.get(k, k)}: <code>{_esc(v)}</code>" for k, v in evaluators.items())
    return f'<p class="note" id="evaluators">Scored with {used}.</p>'


def _gate_section(gate: dict) -> str:
    passed = bool(gate.get("passed"))
    verdict = "passed" if passed else "failed"
    reasons = [str(r) for r in gate.get("reasons") or []]
    out = [f'<section id="gate" class="{verdict}"><span class="verdict">Quality gate: {verdict}</span>']
    if reasons:
        out.append('<ul class="reasons">' + "".join(f"<li>{_esc(r)}</li>" for r in reasons) + "</ul>")
    elif not passed:
        out.append('<p class="note">No reason was recorded.</p>')
    out.append("</section>")
    return "".join(out)


def _grid_table(grid: list[tuple[str, list[str]]]) -> str:
    rows = []
    for prompt, images in grid:
        cells = "".join(f"<td>{_img(uri, f'{prompt} #{i}')}</td>" for i, uri in enumerate(images))
        rows.append(f'<tr class="grid-row"><th scope="row" class="prompt">{_esc(prompt)}</th>{cells}</tr>')
    return '<table id="grid" class="grid">' + "".join(rows) + "</table>"


def _details_table(extra: dict) -> str:
    rows = []
    for key, value in extra.items():
        if isinstance(value, (dict, list, tuple)):
            compact = json.dumps(value, default=str)
            if len(compact) <= DETAILS_INLINE_CHARS:
                cell = _esc(compact)
            else:  # long structures (per-prompt metrics, configs) fold away; <details> needs no script
                summary = f"{len(value)} {'items' if isinstance(value, (list, tuple)) else 'fields'}"
                pretty = _esc(json.dumps(value, indent=2, default=str))
                cell = f"<details><summary>{summary}</summary><pre>{pretty}</pre></details>"
        else:
            cell = _esc(format_value(value) if value is None or isinstance(value, float) else value)
        rows.append(f'<tr><th scope="row">{_esc(key)}</th><td>{cell}</td></tr>')
    return '<table id="details">' + "".join(rows) + "</table>"


def render_report(
    out_html: str,
    *,
    subject: str,
    class_noun: str,
    identifier: str,
    input_images: list[str],
    prior_images: list[str],
    grid: list[tuple[str, list[str]]],
    metrics: dict,
    reference: dict,
    gate: dict,
    extra: dict | None = None,
    training: dict | None = None,
    evaluators: dict[str, str] | None = None,
) -> str:
    """Write report.html for one model to `out_html` (local or gs://) and return that URI.

    `grid` rows are (prompt, sample image URIs); `metrics` keys dino/clip_i/clip_t/pres/div (None: not
    computed); `reference` keys dino/clip_i (real images against each other); `gate` is
    {"passed": bool, "reasons": [...]}; `training`: the model's train_summary.json (loss curve and facts), if known;
    `evaluators`: what scored ({"dino": label or model id, ...}).
    Image URIs may be local paths or gs:// objects.
    """
    prompt = f"a {identifier} {class_noun}"
    title = f"DreamBooth report: {subject}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f'<h1 id="title">{_esc(title)}</h1>',
        f'<p class="sub">identifier <code id="identifier">{_esc(identifier)}</code> · class '
        f'<code id="class-noun">{_esc(class_noun)}</code></p>',
        _gate_section(gate),
        '<h2>How to prompt</h2><p id="how-to-prompt">Put the identifier before the class noun: '
        f'<code id="prompt">{_esc(prompt)}</code>, e.g. <code>{_esc(prompt)} on the beach</code>.</p>',
        "<h2>Metrics</h2>",
        _metrics_table(metrics, reference),
        '<p class="note">DINO and CLIP-I: subject fidelity (cosine similarity of generated to real images); '
        "CLIP-T: prompt fidelity; PRES: subject leaking into plain class prompts; DIV: diversity (LPIPS). "
        "Real images (ceiling): the real photos scored against each other. Paper values: Ruiz et al. 2023, "
        "Table 1.</p>",
        _evaluators_note(evaluators) if evaluators else "",
        _training_section(training) if training else "",
        f'<h2>Input images ({len(input_images)})</h2><div id="inputs" class="strip">',
        *(_img(uri, f"input {i}") for i, uri in enumerate(input_images)),
        "</div>",
    ]
    shown_prior = prior_images[:MAX_PRIOR_SHOWN]
    parts.append(f"<h2>Class prior sample ({len(shown_prior)} of {len(prior_images)})</h2>")
    if shown_prior:
        parts.append('<div id="prior" class="strip">')
        parts.extend(_img(uri, f"prior {i}") for i, uri in enumerate(shown_prior))
        parts.append("</div>")
    else:
        parts.append('<p id="prior" class="note">No prior-preservation images (prior loss off).</p>')
    parts.append(f"<h2>Samples ({len(grid)} prompts)</h2>")
    parts.append(_grid_table(grid))
    if extra:
        parts.append("<h2>Details</h2>")
        parts.append(_details_table(extra))
    parts.append("</body></html>\n")
    storage.write_text(out_html, "\n".join(parts))
    return str(out_html)
