"""What happened to each subject of a batch: one `SubjectStatus` record per subject under `<batch>/status/`.

The subject tasks write them and the summary and the verdict read them back: an exit handler runs whatever
happened, so it reads records rather than task outputs, and a manifest subject without one did not finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreambooth_lib import storage
from dreambooth_lib.runs.batch.manifest import RejectedEntry

SUCCEEDED = ("registered", "trained")
Status = Literal["registered", "trained", "gate failed", "failed", "not finished"]

# what a subject's status takes over from its run's RunResult (run_result.json)
RESULT_KEYS = (
    "identifier",
    "prompt",
    "model_uri",
    "metrics",
    "gate",
    "report_html",
    "registered",
    "wall_time_s",
    "chosen_step",
)


class SubjectStatus(BaseModel):
    """What happened to one subject: written to `<batch>/status/` and read back by the summary."""

    model_config = ConfigDict(extra="ignore")  # records of older versions may hold more keys

    subject: str
    status: Status
    step: str | None = Field(None, description="'plan' when the entry was rejected before training")
    entry: int | None = Field(None, description="index in the manifest (rejected entries)")
    class_noun: str | None = None
    identifier: str | None = None
    error: str | None = None
    run_dir: str | None = None
    base_model_digest: str | None = None
    prompt: str | None = None
    model_uri: str | None = None
    metrics: dict[str, float | None] | None = None
    gate: dict[str, Any] | None = None
    report_html: str | None = None
    registered: dict[str, Any] | None = None
    wall_time_s: float | None = None
    packed: bool | None = Field(None, description="its model was trained in a pack (batch.train_pack)")
    chosen_step: int | None = Field(None, description="train.select: the step whose weights were exported")

    @property
    def ok(self) -> bool:
        return self.status in SUCCEEDED

    def fill_from_result(self, result: Mapping[str, Any]) -> None:
        """Take over what the subject's run recorded (a RunResult as JSON), key by key where it has a value."""
        for key in RESULT_KEYS:
            if result.get(key) is not None:
                setattr(self, key, result[key])


def rejected_status(entry: RejectedEntry, step: str = "plan") -> SubjectStatus:
    return SubjectStatus(subject=entry.name, status="failed", step=step, entry=entry.index, error=entry.error)


def status_dir(batch_root: str, job_id: str) -> str:
    return storage.join(batch_root, job_id, "status")


def write_status(directory: str, status: SubjectStatus) -> str:
    """Write `<directory>/<name>.json`; a rejected entry gets `_rejected-<index>.json`, which no slug can name
    (so a duplicate or malformed name never overwrites a real subject's record nor escapes the folder)."""
    stem = f"_rejected-{status.entry}" if status.entry is not None else status.subject
    uri = storage.join(directory, f"{stem}.json")
    storage.write_json(uri, status.model_dump(mode="json", exclude_none=True))
    return uri


def read_statuses(directory: str) -> list[SubjectStatus]:
    """Every status record under `directory`, in file order (a missing folder has none)."""
    return [
        SubjectStatus.model_validate(storage.read_json(uri))
        for uri in storage.list_files(directory)
        if uri.endswith(".json")
    ]


def with_unfinished(
    statuses: list[SubjectStatus], names: Iterable[str], run_error: str = ""
) -> list[SubjectStatus]:
    """Add a 'not finished' status for each manifest subject without a record (crashed, cancelled, never run)."""
    seen = {s.subject for s in statuses}
    reason = f"did not finish: {run_error}" if run_error else "did not finish (see the pipeline run)"
    missing = [SubjectStatus(subject=n, status="not finished", error=reason) for n in names if n not in seen]
    return [*statuses, *missing]
