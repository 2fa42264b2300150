"""The batch summary (run by the exit handler): a thin adapter over dreambooth_lib.batch.render_summary."""

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
    from dreambooth_lib import batch, storage

    statuses = batch.read_statuses(batch.status_dir(batch_root, job_id))
    names: list[str] = []
    try:
        names = batch.load_manifest(manifest_uri).names
    except Exception as err:  # the summary must still be written when the manifest is the problem
        print(f"manifest unreadable: {err}")
    run_error = (final_status.error_message or "") if final_status.state != "SUCCEEDED" else ""
    statuses = batch.with_unfinished(statuses, names, run_error)
    markdown, page = batch.render_summary(statuses, job_id=job_id, run_error=run_error)
    storage.write_text(summary.path, markdown)
    storage.write_text(summary_html.path, page)
    storage.write_text(storage.join(batch_root, job_id, "summary.md"), markdown)
    storage.write_json(
        storage.join(batch_root, job_id, "summary.json"), batch.summary_record(statuses, job_id)
    )
    summary.metadata.update({"succeeded": sum(s.ok for s in statuses), "subjects": len(statuses)})
    print(markdown)
