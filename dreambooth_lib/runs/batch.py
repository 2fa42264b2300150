"""Many subjects at once: read the batch manifest, plan identifiers, run each subject isolated, summarize.

The library side of `batch_personalize` (the components are adapters over these functions):
- `load_manifest(uri)`: a JSON/YAML file (local or gs://), `{"subjects": [...]}` or a bare list, each entry a
  `BatchEntry`. A manifest that cannot be read is a ConfigError; a bad entry is only *rejected* (with a message
  naming `subjects[i]` and the field) so the other subjects still run.
- `plan_batch(...)`: identifiers chosen one after another, each excluding those before it and the registry's,
  so subjects trained in parallel on one base model never share one.
- `distinct_classes(...)`: one item per class noun, so each (base model, class) prior set is made once.
- `train_pack(...)`: LoRA subjects of the batch (one base model) trained together, K adapters per UNet batch
  (`packed.train_packed_subjects`), each into its own `<run_dir>/train`; full fine-tunes, a pack size of 1 and
  any subject that fails here are left to `run_subject`, which trains them one at a time.
- `run_subject(...)`: one subject end to end via `personalize.run` (reusing a model its pack trained); its
  failure becomes a `SubjectStatus`, never an exception, because on Argo one failed task stops the DAG from
  scheduling the other subjects.
- `render_summary(statuses)`: the batch table as Markdown and HTML.
"""

from __future__ import annotations

import html
import json
import logging
import traceback
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreambooth_lib import storage
from dreambooth_lib.config import IdentifierConfig, RunConfig, Subject, load_config_text, parse_config
from dreambooth_lib.errors import ConfigError, DreamboothError, GateFailed

log = logging.getLogger(__name__)

SUCCEEDED = ("registered", "trained")
Status = Literal["registered", "trained", "gate failed", "failed", "not finished"]


class BatchEntry(Subject):
    """One subject of the manifest: a `Subject` plus an optional fixed identifier (still validated)."""

    identifier: str | None = Field(None, description="use this identifier instead of searching")


class RejectedEntry(BaseModel):
    """A manifest entry left out of the batch, with the message naming `subjects[i]` and the field at fault."""

    index: int
    name: str
    error: str


class BatchManifest(BaseModel):
    """The valid entries of a manifest, in order, and the rejected ones (the batch goes on without them)."""

    uri: str
    entries: list[BatchEntry]
    indices: list[int] = Field(description="the manifest index of each valid entry (names it in messages)")
    rejected: list[RejectedEntry] = Field(default_factory=list)
    names: list[str] = Field(description="every subject name of the manifest, valid or rejected, in order")

    def indexed(self) -> list[tuple[int, BatchEntry]]:
        return list(zip(self.indices, self.entries, strict=True))


class PlannedSubject(BaseModel):
    """A subject ready to train: its entry, its identifier, and what keys the shared prior cache."""

    model_config = ConfigDict(extra="forbid")

    name: str
    class_noun: str
    images: str
    live: bool = False
    identifier: str
    base_model_digest: str
    prior_root: str

    def subject(self) -> Subject:
        return Subject(name=self.name, class_noun=self.class_noun, images=self.images, live=self.live)


class ClassItem(BaseModel):
    """One item of the class loop: the class noun and what the prior step needs to find or make its set."""

    class_noun: str
    base_model_digest: str
    prior_root: str


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

    @property
    def ok(self) -> bool:
        return self.status in SUCCEEDED


class BatchPlan(BaseModel):
    """The plan: subjects to train (distinct identifiers), entries left out, and the distinct classes."""

    subjects: list[PlannedSubject]
    failed: list[SubjectStatus]
    classes: list[str]
    base_model_digest: str
    prior_root: str


# --- the manifest ----------------------------------------------------------------------------------------------


def load_manifest(uri: str) -> BatchManifest:
    """Read and validate a manifest; raises ConfigError only when the file as a whole is unusable."""
    uri = str(uri)
    if not storage.exists(uri):
        raise ConfigError(f"{uri}: manifest not found; give a JSON/YAML file of subjects")
    data = load_config_text(storage.read_text(uri), uri)
    raw = data.get("subjects") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{uri}: expected a non-empty list under 'subjects' (name, class_noun, images)")
    entries: list[BatchEntry] = []
    indices: list[int] = []
    rejected: list[RejectedEntry] = []
    names: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        name = str(item.get("name") or f"subjects[{i}]") if isinstance(item, dict) else f"subjects[{i}]"
        names.append(name)
        try:
            if not isinstance(item, dict):
                raise ConfigError(f"{uri}: subjects[{i}] is not a mapping; give name, class_noun and images")
            entry = parse_config(BatchEntry, item, f"{uri}: subjects[{i}]")
            if entry.name in seen:
                raise ConfigError(
                    f"{uri}: subjects[{i}]: name {entry.name!r} appears twice; subject names must be unique"
                )
        except ConfigError as err:
            rejected.append(RejectedEntry(index=i, name=name, error=str(err)))
            continue
        seen.add(entry.name)
        entries.append(entry)
        indices.append(i)
    return BatchManifest(uri=uri, entries=entries, indices=indices, rejected=rejected, names=names)


def rejected_status(entry: RejectedEntry, step: str = "plan") -> SubjectStatus:
    return SubjectStatus(subject=entry.name, status="failed", step=step, entry=entry.index, error=entry.error)


# --- planning --------------------------------------------------------------------------------------------------


def plan_batch(
    manifest: BatchManifest,
    base_model: str,
    batch_root: str,
    identifier_config: IdentifierConfig | None = None,
    registry_uri: str | None = None,
    prior_root: str | None = None,
    allow_pickle: bool = False,
) -> BatchPlan:
    """Choose each valid entry's identifier; an entry whose identifier cannot be had is left out.

    The tokenizer and the registry's identifiers are read once. Fixed identifiers (an entry's `identifier`) are
    reserved first, in manifest order, so a search never takes one a later entry asked for; then each searched
    subject excludes every identifier taken before it. Parallel subjects of one base model thus never collide
    (the registry only learns of an identifier when its subject registers, too late for the rest of the batch).
    """
    from dreambooth_lib import identifier, models

    base_config = identifier_config or IdentifierConfig()
    tokenizer = identifier.load_tokenizer(base_model, allow_pickle=allow_pickle)
    used = set(identifier.registry_identifiers(registry_uri or None, base_model, allow_pickle=allow_pickle))
    digest = models.model_digest(base_model, allow_pickle=allow_pickle)
    root = prior_root or storage.join(batch_root, "priors")
    failed = [rejected_status(r) for r in manifest.rejected]
    chosen: dict[int, str] = {}
    fixed_first = sorted(
        manifest.indexed(), key=lambda item: item[1].identifier is None
    )  # stable: order kept
    for index, entry in fixed_first:
        config = (
            base_config.model_copy(update={"identifier": entry.identifier})
            if entry.identifier
            else base_config
        )
        try:
            result = identifier.choose_identifier(tokenizer, entry.class_noun, config, exclude=used)
        except DreamboothError as err:
            error = f"{manifest.uri}: subjects[{index}] ({entry.name}): {err}"
            failed.append(rejected_status(RejectedEntry(index=index, name=entry.name, error=error)))
            continue
        used.add(result.identifier)
        chosen[index] = result.identifier
    subjects = [
        PlannedSubject(
            **entry.model_dump(exclude={"identifier"}),
            identifier=chosen[index],
            base_model_digest=digest,
            prior_root=root,
        )
        for index, entry in manifest.indexed()
        if index in chosen
    ]
    failed.sort(key=lambda s: s.entry or 0)
    classes = sorted({s.class_noun for s in subjects})
    return BatchPlan(
        subjects=subjects, failed=failed, classes=classes, base_model_digest=digest, prior_root=root
    )


def distinct_classes(subjects: Iterable[PlannedSubject | Mapping[str, Any]]) -> list[ClassItem]:
    """One item per class noun, sorted: the prior set of each (base model, class) is made once per batch."""
    by_class: dict[str, ClassItem] = {}
    for s in subjects:
        s = s if isinstance(s, PlannedSubject) else PlannedSubject.model_validate(dict(s))
        by_class.setdefault(
            s.class_noun,
            ClassItem(
                class_noun=s.class_noun, base_model_digest=s.base_model_digest, prior_root=s.prior_root
            ),
        )
    return [by_class[noun] for noun in sorted(by_class)]


# --- one subject -----------------------------------------------------------------------------------------------


def subject_run_dir(batch_root: str, job_id: str, name: str) -> str:
    return storage.join(batch_root, job_id, "subjects", name)


def status_dir(batch_root: str, job_id: str) -> str:
    return storage.join(batch_root, job_id, "status")


def subject_run_values(
    run_options: Mapping[str, Any] | None,
    *,
    resolution: int,
    steps: int,
    prior_loss_weight: float,
    prior_size: int,
    prior_root: str,
    mode: str,
    eval_prompts: Iterable[str] = (),
    gate_thresholds: Mapping[str, Any] | None = None,
    prior_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The batch pipeline's parameters laid onto `run_options` (a deep copy) as RunConfig sections: one place, so
    the pack step and the subject step build the very same RunConfig (and find the same prior set)."""
    values = json.loads(json.dumps(dict(run_options or {})))
    values.setdefault("ingest", {})["resolution"] = resolution
    values["prior"] = {
        **values.get("prior", {}),
        **dict(prior_options or {}),
        "num_images": prior_size,
        "root": prior_root,
    }
    values.setdefault("train", {}).update(
        steps=steps, prior_loss_weight=prior_loss_weight, mode=mode, resolution=resolution
    )
    eval_values = values.setdefault("eval", {})
    if eval_prompts:
        eval_values["prompts"] = list(eval_prompts)
    eval_values["gate"] = {**eval_values.get("gate", {}), **dict(gate_thresholds or {})}
    return values


def subject_config(
    subject: PlannedSubject,
    base_model: str,
    run_dir: str,
    run_options: Mapping[str, Any] | None = None,
    registry_uri: str | None = None,
    allow_pickle: bool = False,
) -> RunConfig:
    """The RunConfig of one subject: `run_options` plus its subject, identifier, base model, run dir, registry."""
    values = dict(run_options or {})
    values.update(
        base_model=base_model,
        run_dir=run_dir,
        allow_pickle=allow_pickle,
        subject=subject.subject().model_dump(),
        registry={"uri": registry_uri} if registry_uri else None,
        identifier={**values.get("identifier", {}), "identifier": subject.identifier},
    )
    return parse_config(RunConfig, values, f"subject {subject.name}: run_options")


def run_subject(
    subject: PlannedSubject,
    base_model: str,
    run_dir: str,
    run_options: Mapping[str, Any] | None = None,
    registry_uri: str | None = None,
    allow_pickle: bool = False,
) -> SubjectStatus:
    """Train, evaluate and register one subject; any failure of its own is returned as its status, not raised.

    `run_options` holds the other RunConfig sections (ingest, prior, train, eval, sample_prompts, ...); the
    subject, its identifier, the base model, the run directory and the registry are set here. A model that
    `train_pack` already trained into `<run_dir>/train` for this configuration is used, not trained again.
    """
    from dreambooth_lib.runs import personalize

    status = SubjectStatus(
        subject=subject.name,
        status="failed",
        class_noun=subject.class_noun,
        identifier=subject.identifier,
        run_dir=run_dir,
        base_model_digest=subject.base_model_digest,
    )
    try:
        config = subject_config(subject, base_model, run_dir, run_options, registry_uri, allow_pickle)
        # resume: a rerun of this task (a preempted pod) continues from the run's checkpoints in the durable run dir
        result = personalize.run(config, resume=True, reuse_training=True)
        _fill_from_result(status, result.model_dump(mode="json"))
        status.packed = result.reused_training or None
        status.status = "registered" if result.registered else "trained"
    except GateFailed as err:
        # The run's artifacts are kept; its run_result.json holds the metrics that failed the gate.
        status.status, status.error = "gate failed", str(err)
        result_uri = storage.join(run_dir, "run_result.json")
        if storage.exists(result_uri):
            _fill_from_result(status, storage.read_json(result_uri))
    except Exception as err:  # the isolation boundary of one subject: its failure is reported, not raised
        log.error("subject %s failed:\n%s", subject.name, traceback.format_exc())
        status.status, status.error = "failed", f"{type(err).__name__}: {err}"
    return status


# --- packed LoRA training ----------------------------------------------------------------------------------------


class PackStatus(BaseModel):
    """One subject of `train_pack`: trained in a pack, or left for `run_subject` to train alone (and why)."""

    subject: str
    packed: bool
    model_uri: str | None = None
    reason: str | None = None


def packed_record_uri(batch_root: str, job_id: str) -> str:
    """`<batch>/packed.json`: beside, not inside, status/ (whose every file is a SubjectStatus)."""
    return storage.join(batch_root, job_id, "packed.json")


def train_pack(
    subjects: Iterable[PlannedSubject | Mapping[str, Any]],
    base_model: str,
    batch_root: str,
    job_id: str,
    run_options: Mapping[str, Any] | None = None,
    pack_size: int = 0,
    registry_uri: str | None = None,
    allow_pickle: bool = False,
) -> list[PackStatus]:
    """Train the batch's LoRA subjects together, each into `<run_dir>/train`, before the subject loop runs.

    A LoRA step of one subject leaves a large GPU mostly idle; `packed.train_packed_subjects` trains up to
    `pack_size` subjects (0: as many as the GPU's free memory holds, `packed.default_pack_size`) in one UNet batch,
    each exactly as its own run would. Each subject is ingested and its class's prior set found (the class loop
    made it: `prior.run` finds it in the shared cache) with its own RunConfig, so `run_subject` later sees the
    same inputs and reuses the model. Does nothing (returns []) for full fine-tunes, text-encoder training, a pack
    size of 1 or fewer than 2 subjects: the subject loop then trains one subject per task, as without packing.
    A subject that fails here is only left untrained: its `run_subject` trains it alone or reports its failure.
    Writes the statuses to `packed.json` of the batch. Raises nothing for a subject's failure.
    """
    from dreambooth_lib import ingest, prior
    from dreambooth_lib.train import multi_subject as packed

    planned = [
        s if isinstance(s, PlannedSubject) else PlannedSubject.model_validate(dict(s)) for s in subjects
    ]
    configs: dict[str, RunConfig] = {}
    statuses: dict[str, PackStatus] = {}
    for s in planned:
        run_dir = subject_run_dir(batch_root, job_id, s.name)
        try:
            configs[s.name] = subject_config(s, base_model, run_dir, run_options, registry_uri, allow_pickle)
        except Exception as err:  # its run_subject reports the same error
            statuses[s.name] = PackStatus(subject=s.name, packed=False, reason=_reason(err))
    if not configs:
        return []
    train_config = next(iter(configs.values())).train
    if train_config.mode != "lora" or train_config.train_text_encoder:
        log.info("packing off: train.mode %s, train_text_encoder %s", train_config.mode,
                 train_config.train_text_encoder)  # fmt: skip
        return []
    size = pack_size or packed.default_pack_size(
        train_config.device, train_config.resolution, train_config.batch_size, base_model=base_model
    )
    if size < 2 or len(configs) < 2:
        log.info("packing off: pack size %d, %d subjects", size, len(configs))
        return []

    to_pack: list[packed.PackedSubject] = []
    priors: dict[str, Any] = {}  # class noun -> PriorResult: one cache look-up per class
    for s in planned:
        config = configs.get(s.name)
        if config is None:
            continue
        try:
            ingest_dir = storage.join(config.run_dir, "ingest")
            ingest.run(s.images, ingest_dir, config.ingest, class_noun=s.class_noun)
            prior_result = None
            if config.train.prior_loss_weight > 0 and config.prior.num_images > 0:
                if s.class_noun not in priors:
                    priors[s.class_noun] = prior.run(
                        base_model,
                        s.class_noun,
                        config.prior,
                        root=config.prior.root or storage.join(config.run_dir, "priors"),
                        resolution=config.prior.resolution or config.train.resolution,
                        allow_pickle=allow_pickle,
                    )
                prior_result = priors[s.class_noun]
        except Exception as err:  # left to its run_subject, which reports it
            statuses[s.name] = PackStatus(subject=s.name, packed=False, reason=_reason(err))
            continue
        to_pack.append(
            packed.PackedSubject(
                name=s.name,
                instance_dir=ingest_dir,
                prior_dir=prior_result.uri if prior_result else None,
                identifier=s.identifier,
                class_noun=s.class_noun,
                out=storage.join(config.run_dir, "train"),
                prior_images=list(prior_result.images) if prior_result else None,
            )
        )
    if to_pack:
        try:
            results = packed.train_packed_subjects(
                base_model, to_pack, train_config, pack_size=size, allow_pickle=allow_pickle
            )
        except Exception as err:  # e.g. a bad pack_size: every subject trains alone instead
            results = [packed.PackedResult(name=p.name, ok=False, error=_reason(err)) for p in to_pack]
        for r in results:
            statuses[r.name] = PackStatus(subject=r.name, packed=r.ok, model_uri=r.model_uri, reason=r.error)
    ordered = [statuses[s.name] for s in planned if s.name in statuses]
    storage.write_json(
        packed_record_uri(batch_root, job_id),
        {"pack_size": size, "subjects": [p.model_dump(mode="json", exclude_none=True) for p in ordered]},
    )
    return ordered


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, DreamboothError) else f"{type(err).__name__}: {err}"


RESULT_KEYS = (
    "identifier",
    "prompt",
    "model_uri",
    "metrics",
    "gate",
    "report_html",
    "registered",
    "wall_time_s",
)


def _fill_from_result(status: SubjectStatus, result: Mapping[str, Any]) -> None:
    for key in RESULT_KEYS:
        if result.get(key) is not None:
            setattr(status, key, result[key])


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


# --- the summary -----------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = (
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
)


def summary_title(statuses: list[SubjectStatus], job_id: str = "") -> str:
    ok = sum(1 for s in statuses if s.ok)
    label = f"Batch {job_id}" if job_id else "Batch"
    return f"{label}: {ok} of {len(statuses)} subjects succeeded"


def summary_rows(statuses: list[SubjectStatus]) -> list[list[str]]:
    """One row per status, sorted by subject (then manifest index), cells as in SUMMARY_COLUMNS."""

    def metric(s: SubjectStatus, key: str) -> str:
        value = (s.metrics or {}).get(key)
        return f"{value:.3f}" if isinstance(value, (int, float)) else ""

    def gate(s: SubjectStatus) -> str:
        if not s.gate:
            return ""
        return "passed" if s.gate.get("passed") else "failed: " + "; ".join(s.gate.get("reasons", []))

    ordered = sorted(statuses, key=lambda s: (s.subject, s.entry if s.entry is not None else -1))
    return [
        [
            s.subject,
            s.class_noun or "",
            s.identifier or "",
            s.status + (f" ({s.error})" if s.error else ""),
            metric(s, "dino"),
            metric(s, "clip_i"),
            metric(s, "clip_t"),
            gate(s),
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


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _html_cell(text: str) -> str:
    """Escaped text; a link (gs://, http(s)://, a path to report.html) is made clickable."""
    escaped = html.escape(text)
    if text.startswith(("http://", "https://")) or text.endswith(".html"):
        return f"<a href='{escaped}'>{escaped}</a>"
    return escaped


def render_status(status: SubjectStatus) -> str:
    """One subject's status as Markdown (the subject task's `status` artifact)."""
    import json

    lines = [f"# {status.subject}: {status.status}", ""]
    for key in (
        "identifier",
        "class_noun",
        "error",
        "model_uri",
        "metrics",
        "gate",
        "report_html",
        "registered",
    ):
        value = getattr(status, key)
        if value is not None:
            lines.append(f"- **{key}**: `{json.dumps(value, default=str)}`")
    return "\n".join(lines) + "\n"
