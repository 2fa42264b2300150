"""The batch summary (run by the exit handler): a table of subjects, identifiers, metrics, gate verdicts, links."""

from kfp import dsl
from kfp.dsl import HTML, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def summarize_batch(
    manifest_uri: str,
    batch_root: str,
    job_id: str,
    final_status: dsl.PipelineTaskFinalStatus,
    summary: Output[Markdown],
    summary_html: Output[HTML],
):
    """Read every subject's status record and write the table, also to `<batch_root>/<job_id>/summary.md`.

    An exit handler runs whatever happened before it, so it reads what the subjects wrote rather than their
    task outputs: a subject of the manifest without a record is reported as not finished (crashed, cancelled,
    or the run failed before it started), with the run's own error when there is one.
    """
    import html

    from dreambooth_lib import storage
    from dreambooth_lib.config import load_config_text

    status_dir = storage.join(batch_root, job_id, "status")
    records = {}
    for uri in storage.list_files(status_dir):
        if uri.endswith(".json"):
            record = storage.read_json(uri)
            records[record["subject"]] = record
    names: list[str] = []
    try:
        data = load_config_text(storage.read_text(manifest_uri), manifest_uri)
        entries = data.get("subjects") if isinstance(data, dict) else data
        names = [str(e.get("name")) for e in entries if isinstance(e, dict) and e.get("name")]
    except Exception as err:  # the summary must still be written when the manifest is the problem
        print(f"manifest unreadable: {err}")
    run_error = (final_status.error_message or "") if final_status.state != "SUCCEEDED" else ""
    not_finished = f"did not finish{': ' + run_error if run_error else ' (see the pipeline run)'}"
    for name in names:
        records.setdefault(name, {"subject": name, "status": "not finished", "error": not_finished})

    def metric(record, key):
        value = (record.get("metrics") or {}).get(key)
        return f"{value:.3f}" if isinstance(value, (int, float)) else ""

    def gate(record):
        verdict = record.get("gate")
        if not verdict:
            return ""
        return "passed" if verdict.get("passed") else "failed: " + "; ".join(verdict.get("reasons", []))

    header = [
        "subject",
        "class",
        "identifier",
        "status",
        "DINO",
        "CLIP-I",
        "CLIP-T",
        "gate",
        "model",
        "report",
    ]
    rows = []
    for name in sorted(records):
        r = records[name]
        registered = r.get("registered") or {}
        rows.append(
            [
                name,
                r.get("class_noun") or "",
                r.get("identifier") or "",
                r["status"] + (f" ({r['error']})" if r.get("error") else ""),
                metric(r, "dino"),
                metric(r, "clip_i"),
                metric(r, "clip_t"),
                gate(r),
                registered.get("uri") or r.get("model_uri") or "",
                r.get("report_html") or "",
            ]
        )
    ok = sum(1 for name in records if records[name]["status"] in ("registered", "trained"))
    title = f"Batch {job_id}: {ok} of {len(records)} subjects succeeded"
    md = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    if run_error:
        md += ["", f"Run error: {run_error}"]
    markdown = "\n".join(md) + "\n"
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
        "<table border='1' cellpadding='4'><tr>"
        + "".join(f"<th>{h}</th>" for h in header)
        + f"</tr>{cells}</table>"
    )
    storage.write_text(summary.path, markdown)
    storage.write_text(summary_html.path, page)
    storage.write_text(storage.join(batch_root, job_id, "summary.md"), markdown)
    storage.write_json(
        storage.join(batch_root, job_id, "summary.json"), {"title": title, "subjects": records}
    )
    summary.metadata.update({"succeeded": ok, "subjects": len(records)})
    print(markdown)
