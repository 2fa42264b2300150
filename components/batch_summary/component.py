"""The batch's last word: the summary table (run by the exit handler, a thin adapter over
dreambooth_lib.runs.batch.summary) and the verdict (a task inside the handler, over dreambooth_lib.runs.batch.verdict)
that fails the run when no subject succeeded."""

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
    or the run failed before it started), with the run's own error when there is one. It never fails on the
    batch's outcome: `check_batch` does (see its docstring for why that is not this task's job).
    """
    from dreambooth_lib import artifacts, storage
    from dreambooth_lib.runs.batch.manifest import load_manifest
    from dreambooth_lib.runs.batch.status import read_statuses, status_dir, with_unfinished
    from dreambooth_lib.runs.batch.summary import render_summary, summary_record

    statuses = read_statuses(status_dir(batch_root, job_id))
    names: list[str] = []
    try:
        names = load_manifest(manifest_uri).names
    except Exception as err:  # the summary must still be written when the manifest is the problem
        print(f"manifest unreadable: {err}")
    run_error = (final_status.error_message or "") if final_status.state != "SUCCEEDED" else ""
    statuses = with_unfinished(statuses, names, run_error)
    markdown, page = render_summary(statuses, job_id=job_id, run_error=run_error)
    storage.write_text(summary.path, markdown)
    storage.write_text(summary_html.path, page)
    storage.write_text(storage.join(batch_root, job_id, artifacts.BATCH_SUMMARY_MD_NAME), markdown)
    storage.write_json(
        storage.join(batch_root, job_id, artifacts.BATCH_SUMMARY_JSON_NAME), summary_record(statuses, job_id)
    )
    summary.metadata.update({"succeeded": sum(s.ok for s in statuses), "subjects": len(statuses)})
    print(markdown)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def check_batch(manifest_uri: str, batch_root: str, job_id: str) -> str:
    """The batch's verdict (dreambooth_lib.runs.batch.verdict), run inside the exit handler after every subject:
    fails the run with BatchFailed, naming each subject's reason, when no subject succeeded; returns the line
    'Batch <job>: k of n subjects succeeded' otherwise.

    Not the summary's job: on KFP the exit handler is an Argo exit hook whose failure leaves the run's state
    unchanged (and a failed task uploads no artifacts, so the summary table would be lost from the UI).
    """
    from dreambooth_lib.runs.batch import verdict

    line = verdict.check_batch(batch_root, job_id, manifest_uri)
    print(line)
    return line
