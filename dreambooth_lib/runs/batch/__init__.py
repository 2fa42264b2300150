"""Many subjects at once: read the batch manifest, plan identifiers, train LoRA subjects in packs, run each
subject isolated, record its status, summarize, and give the batch's verdict.

The library side of `batch_personalize` (the components are adapters over these modules):
- `manifest`: `load_manifest(uri)`; a bad entry is only rejected, naming `subjects[i]` and the field.
- `plan`: `plan_batch(...)` (distinct identifiers across the batch and the registry), `distinct_classes(...)`
  (one prior set per (base model, class)).
- `pack`: `train_pack(...)`: the LoRA subjects trained K per UNet batch, each into its own `<run_dir>/train`.
- `subject`: `run_subject(subject, run_dir, BatchSettings(...))`: one subject end to end via `personalize.run`,
  its failure a status.
- `status`: `SubjectStatus` records under `<batch>/status/`, written by the subjects, read by the summary.
- `summary`: `render_summary(statuses)`, the batch table as Markdown and HTML.
- `verdict`: `check_batch(...)`, which fails the run when no subject succeeded.
"""

from dreambooth_lib.runs.batch.manifest import BatchEntry, BatchManifest, RejectedEntry, load_manifest
from dreambooth_lib.runs.batch.pack import PackStatus, packed_record_uri, train_pack
from dreambooth_lib.runs.batch.plan import BatchPlan, ClassItem, PlannedSubject, distinct_classes, plan_batch
from dreambooth_lib.runs.batch.status import (
    RESULT_KEYS,
    SUCCEEDED,
    Status,
    SubjectStatus,
    read_statuses,
    rejected_status,
    status_dir,
    with_unfinished,
    write_status,
)
from dreambooth_lib.runs.batch.subject import (
    BatchSettings,
    run_subject,
    subject_config,
    subject_run_dir,
    subject_run_values,
)
from dreambooth_lib.runs.batch.summary import (
    SUMMARY_COLUMNS,
    packing_note,
    render_status,
    render_summary,
    summary_record,
    summary_rows,
    summary_title,
)
from dreambooth_lib.runs.batch.verdict import BatchFailed, check_batch
