"""The verdict of a batch run: when no subject succeeded the run must end failed; a partial success stays
succeeded, with the failures in the summary.

Why a task of its own: `batch_personalize` writes its summary in an exit handler, and on Kubeflow Pipelines
(2.4 and later) an exit handler is an Argo exit lifecycle hook, whose failure does not change the run's state;
the run's state is that of the tasks inside the handler. So the verdict is a task inside the handler, after
the subjects: it fails the run on KFP and on Vertex AI alike, while the summary still runs and is uploaded.
"""

from __future__ import annotations

from collections.abc import Iterable

from dreambooth_lib import artifacts, storage
from dreambooth_lib.errors import DreamboothError
from dreambooth_lib.runs.batch.manifest import load_manifest
from dreambooth_lib.runs.batch.status import SubjectStatus, read_statuses, status_dir, with_unfinished
from dreambooth_lib.runs.batch.summary import summary_title

MAX_LISTED = 5


class BatchFailed(DreamboothError):
    """No subject of the batch succeeded (each subject's reason is in the message and in the summary)."""


def verdict(
    statuses: list[SubjectStatus], names: Iterable[str] = (), job_id: str = "", summary_uri: str = ""
) -> str:
    """One line ('Batch j1: 2 of 3 subjects succeeded') when at least one subject succeeded, else BatchFailed
    naming why each subject failed. Manifest subjects without a status record count as not finished."""
    statuses = with_unfinished(statuses, names)
    title = summary_title(statuses, job_id)
    if any(s.ok for s in statuses):
        return title
    where = f"; every subject's row is in {summary_uri}" if summary_uri else ""
    if not statuses:
        raise BatchFailed(f"{title}: the batch had no subject to run (is the manifest empty?){where}")
    ordered = sorted(statuses, key=lambda s: s.subject)
    reasons = [
        f"{s.subject}: {s.status}" + (f" ({s.error})" if s.error else "") for s in ordered[:MAX_LISTED]
    ]
    if len(ordered) > MAX_LISTED:
        reasons.append(f"and {len(ordered) - MAX_LISTED} more")
    raise BatchFailed(f"{title}, so the batch failed: {'; '.join(reasons)}{where}")


def check_batch(batch_root: str, job_id: str, manifest_uri: str = "") -> str:
    """The verdict from the status records the subjects wrote under `<batch_root>/<job_id>/status/`."""
    statuses = read_statuses(status_dir(batch_root, job_id))
    names: list[str] = []
    if manifest_uri:
        try:
            names = load_manifest(manifest_uri).names
        except DreamboothError:
            names = []  # a manifest the plan refused has already failed the run, with its own message
    return verdict(statuses, names, job_id, storage.join(batch_root, job_id, artifacts.BATCH_SUMMARY_MD_NAME))
