"""The model registry: immutable, numbered versions of personalized models, each with its card and lineage.

Layout under the root (a local folder or a gs:// prefix):

    index.json                          the list of entries, one per claimed version: the commit point
    <subject>/<version>/model/          the weights, copied from the trained model (diffusers or LoRA folder)
    <subject>/<version>/model_card.md   Hugging Face-style card: YAML front matter, how to prompt, metrics...
    <subject>/<version>/lineage.json    every input URI and digest, the configs, the code version, the time
    <subject>/<version>/report.html     the evaluation report, when there is one
    <subject>/<version>/samples/NN.png  the sample images the card shows

Commit protocol (claim -> write -> publish). Versions are 1, 2, 3... per subject, allocated inside one atomic
read-modify-write of index.json that also checks identifier uniqueness, so two writers can never get the same
number or the same identifier: on GCS the write carries `if_generation_match` and a writer that lost the race
re-reads and retries (exponential backoff with full jitter); locally the read-modify-write holds an flock and
replaces the file atomically. The claimed entry has status "pending"; only then are the files written into the
version's folder, which no one else can claim; a second read-modify-write marks the entry "ready". Readers
(`list_models`, `show`) see only "ready" entries, so a listed version always has all its files;
`used_identifiers` also counts "pending" ones, whose identifiers are taken. If writing fails the entry is
marked "failed" and its partial folder removed. A crashed writer (a preempted pod, a SIGKILL) leaves a "pending"
entry: every claim carries a lease (`lease_expires`, PENDING_LEASE_S after the claim), and the next registration
marks pending entries whose lease has passed "abandoned" and deletes their partial folders; an expired claim no
longer holds its identifier, and its writer, should it still be alive, can no longer publish it (publishing
requires the entry to still be "pending"). Either way the number is never handed out again, so a version folder
is written once.

Registering is idempotent: the same weights (by content digest) with the same identifier, base model, metrics,
gate and lineage for the same subject return the version already published instead of a copy, so a retried task
does not duplicate it.

Backends. `Registry` does the validation, the files and the card; a `RegistryBackend` does the bookkeeping
(entries, atomic claims, status changes). `FileRegistryBackend` keeps index.json beside the files. Another
catalogue plugs in by implementing the four methods and registering a factory:

    register_backend("vertex", lambda uri: VertexBackend(uri))   # then open_registry(uri, backend="vertex")

e.g. a Vertex AI Model Registry backend would claim with `Model.upload(parent_model=..., artifact_uri=<version
uri>, labels={"status": "pending"})` and publish by updating labels/aliases; an MLflow backend would create a
`ModelVersion` with tags for the status. The files still go to `version_uri(...)` via dreambooth_lib.storage.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel

import dreambooth_lib
from dreambooth_lib import storage
from dreambooth_lib.config import SUBJECT_NAME_PATTERN
from dreambooth_lib.errors import ConfigError, DreamboothError, GateFailed, PreconditionFailed, StorageError
from dreambooth_lib.evaluate.report import METRICS, PAPER_REAL_IMAGES, PAPER_SD_DREAMBOOTH, format_value

INDEX_NAME = "index.json"
MODEL_FOLDER = "model"
CARD_NAME = "model_card.md"
LINEAGE_NAME = "lineage.json"
REPORT_NAME = "report.html"
SAMPLES_FOLDER = "samples"
MAX_CARD_SAMPLES = 8
LORA_WEIGHTS_NAME = (
    "pytorch_lora_weights.safetensors"  # models.LORA_WEIGHTS_NAME; not imported to stay torch-free
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_LICENSE_NOTE = (
    "The weights are derived from the base model and carry its license. Subject photos: DreamBench photos "
    "(google/dreambooth dataset) are CC BY 4.0, with images from Unsplash under the Unsplash License or "
    "taken by the paper's authors (see the dataset's references_and_licenses.txt); photos of your own are "
    "under your terms."
)
# GCS read-modify-write retries: full-jitter exponential backoff, ~1 min in all before giving up.
RETRY_BASE_S = 0.02
RETRY_CAP_S = 2.0
RETRY_ATTEMPTS = 40

# How long a claimed version may stay "pending" before another writer retires it: far above the minutes that
# copying even a full fp32 SD UNet takes, far below "forever" (a crashed writer's identifier is free again after).
PENDING_LEASE_S = 3600

Status = Literal["pending", "ready", "failed", "abandoned"]
T = TypeVar("T")


class RegisteredModel(BaseModel):
    """One version of one subject's model: an index entry plus where its files are."""

    subject: str
    version: int
    identifier: str
    class_noun: str
    base_model: str
    base_model_digest: str
    uri: str  # the version folder
    model_uri: str  # <uri>/model: what `dreambooth generate --model` and models.load_pipeline take
    mode: Literal["full", "lora"]
    metrics: dict[str, float | None] | None = None
    gate_passed: bool | None = None  # None: not evaluated
    status: Status = "ready"
    created: str
    card_uri: str
    lineage_uri: str
    report_uri: str | None = None

    @property
    def prompt(self) -> str:
        return f"a {self.identifier} {self.class_noun}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _lease_expired(entry: dict, now: datetime | None = None) -> bool:
    """A pending entry whose writer is presumed dead: past its lease (or, for entries written before leases,
    PENDING_LEASE_S after it was created). Entries with unreadable times are never presumed dead."""
    if entry.get("status") != "pending":
        return False
    expires = _parse_time(entry.get("lease_expires"))
    if expires is None:
        created = _parse_time(entry.get("created"))
        if created is None:
            return False
        expires = datetime.fromtimestamp(created.timestamp() + PENDING_LEASE_S, timezone.utc)
    return (now or datetime.now(timezone.utc)) >= expires


def _holds_identifier(entry: dict) -> bool:
    return entry.get("status") == "ready" or (entry.get("status") == "pending" and not _lease_expired(entry))


def _identifier_key(entry: dict) -> str:
    """Identifiers are unique per base model: its content digest, or its URI when no digest was recorded."""
    return entry.get("base_model_digest") or entry["base_model"]


# --- backends -----------------------------------------------------------------------------------------------


class RegistryBackend(ABC):
    """Bookkeeping of a registry: which versions exist, claimed atomically. Files go to `version_uri`."""

    root: str

    @abstractmethod
    def entries(self) -> list[dict]:
        """Every entry, whatever its status, in claim order."""

    @abstractmethod
    def claim(self, draft: dict, check: Callable[[list[dict]], None]) -> dict:
        """Atomically: call `check(entries)` (it raises to refuse), give `draft["subject"]` its next version
        number, record the entry as "pending" and return it (with version, uri, created)."""

    @abstractmethod
    def set_status(
        self,
        subject: str,
        version: int,
        status: Status,
        updates: dict | None = None,
        expect: Status | None = None,
    ) -> dict:
        """Change a claimed entry's status ("ready" publishes it, "failed"/"abandoned" retire its number),
        merging `updates` into it; returns it. With `expect`, atomically: only if the entry's status is still
        `expect`, else raise PreconditionFailed and change nothing."""

    @abstractmethod
    def version_uri(self, subject: str, version: int) -> str:
        """The folder (local or gs://) where a version's files live."""


class FileRegistryBackend(RegistryBackend):
    """index.json under the root, updated by conditional writes (GCS generations) or under an flock."""

    def __init__(self, root: str, pending_lease_s: float = PENDING_LEASE_S):
        self.root = str(root).rstrip("/") if storage.is_gcs(root) else str(root)
        self.index_uri = storage.join(self.root, INDEX_NAME)
        self.pending_lease_s = pending_lease_s

    def version_uri(self, subject: str, version: int) -> str:
        return storage.join(self.root, subject, str(version))

    def _parse(self, data: bytes | None) -> list[dict]:
        if data is None:
            return []
        try:
            entries = json.loads(data)
        except json.JSONDecodeError as err:
            raise StorageError(
                f"{self.index_uri}: not valid JSON ({err}); restore it from a backup or object version"
            ) from None
        if not isinstance(entries, list):
            raise StorageError(
                f"{self.index_uri}: expected a JSON list of entries, got {type(entries).__name__}"
            )
        return entries

    def entries(self) -> list[dict]:
        data, _ = storage.read_bytes_with_generation(self.index_uri)
        return self._parse(data)

    def _update(self, mutate: Callable[[list[dict]], T]) -> T:
        """Read-modify-write of the index; `mutate` edits the list in place and may run more than once."""
        if not storage.is_gcs(self.index_uri):
            with storage.locked(self.index_uri):
                data, _ = storage.read_bytes_with_generation(self.index_uri)
                entries = self._parse(data)
                result = mutate(entries)
                storage.write_json(self.index_uri, entries)
                return result
        for attempt in range(RETRY_ATTEMPTS):
            data, generation = storage.read_bytes_with_generation(self.index_uri)
            entries = self._parse(data)
            result = mutate(entries)
            body = (json.dumps(entries, indent=2) + "\n").encode()
            try:
                storage.write_bytes(self.index_uri, body, if_generation_match=generation)
                return result
            except PreconditionFailed:
                time.sleep(random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt)))
        raise StorageError(
            f"{self.index_uri}: still changing after {RETRY_ATTEMPTS} attempts (too many concurrent "
            "registrations); retry the registration"
        )

    def claim(self, draft: dict, check: Callable[[list[dict]], None]) -> dict:
        subject = draft["subject"]

        def allocate(entries: list[dict]) -> dict:
            check(entries)
            version = max((e["version"] for e in entries if e["subject"] == subject), default=0) + 1
            # A folder the index does not know (an index restored from backup): never write into it.
            while storage.exists(self.version_uri(subject, version)):
                version += 1
            entry = {
                **draft,
                "version": version,
                "uri": self.version_uri(subject, version),
                "status": "pending",
            }
            entry["created"] = _now()
            entry["lease_expires"] = datetime.fromtimestamp(
                time.time() + self.pending_lease_s, timezone.utc
            ).isoformat(timespec="seconds")
            entries.append(entry)
            return entry

        return self._update(allocate)

    def set_status(
        self,
        subject: str,
        version: int,
        status: Status,
        updates: dict | None = None,
        expect: Status | None = None,
    ) -> dict:
        def mark(entries: list[dict]) -> dict:
            for e in entries:
                if e["subject"] == subject and e["version"] == version:
                    if expect is not None and e.get("status") != expect:
                        raise PreconditionFailed(
                            f"{self.index_uri}: {subject} v{version} is {e.get('status')!r}, not {expect!r}"
                        )
                    e.update(updates or {})
                    e["status"] = status
                    e[f"{status}_at"] = _now()
                    return e
            raise StorageError(f"{self.index_uri}: entry {subject} v{version} vanished from the index")

        return self._update(mark)


_BACKENDS: dict[str, Callable[[str], RegistryBackend]] = {"file": FileRegistryBackend}


def register_backend(name: str, factory: Callable[[str], RegistryBackend]) -> None:
    """Make `open_registry(uri, backend=name)` build `factory(uri)`."""
    _BACKENDS[name] = factory


def open_registry(uri: str, backend: str = "file") -> Registry:
    """The registry rooted at `uri` (local folder or gs:// prefix); `backend` as in RegistryConfig.backend."""
    if not str(uri).strip():
        raise ConfigError("registry uri is empty; give a local folder or gs://bucket/prefix")
    if backend not in _BACKENDS:
        raise ConfigError(f"registry.backend {backend!r} is unknown; known: {', '.join(sorted(_BACKENDS))}")
    return Registry(_BACKENDS[backend](str(uri)))


# --- the registry -------------------------------------------------------------------------------------------


class Registry:
    """Register, list and show models; see the module docstring for the layout and the commit protocol."""

    def __init__(self, backend: RegistryBackend):
        self.backend = backend
        self.root = backend.root

    # reading

    def _ready(self) -> list[RegisteredModel]:
        return [
            RegisteredModel.model_validate(e) for e in self.backend.entries() if e.get("status") == "ready"
        ]

    def list_models(self, subject: str | None = None) -> list[RegisteredModel]:
        """Published versions, by subject then version."""
        models = [m for m in self._ready() if subject is None or m.subject == subject]
        return sorted(models, key=lambda m: (m.subject, m.version))

    def show(self, subject: str, version: int | None = None) -> RegisteredModel:
        """One published version (the latest by default); the error lists what exists."""
        models = self.list_models()
        versions = [m for m in models if m.subject == subject]
        if not versions:
            known = sorted({m.subject for m in models})
            raise DreamboothError(
                f"{self.root}: no registered model for subject {subject!r}; known subjects: "
                f"{', '.join(known) if known else '(none: the registry is empty)'}"
            )
        if version is None:
            return versions[-1]
        for m in versions:
            if m.version == version:
                return m
        raise DreamboothError(
            f"{self.root}: subject {subject!r} has no version {version}; versions: "
            f"{', '.join(str(m.version) for m in versions)}"
        )

    def model_card(self, subject: str, version: int | None = None) -> str:
        """The model_card.md text of a published version (the latest by default)."""
        return storage.read_text(self.show(subject, version).card_uri)

    def used_identifiers(self, base_model_digest: str | None = None) -> set[str]:
        """Identifiers taken (published or being registered), on one base model or on any."""
        return {
            e["identifier"]
            for e in self.backend.entries()
            if _holds_identifier(e) and (base_model_digest is None or _identifier_key(e) == base_model_digest)
        }

    def retire_abandoned(self) -> list[dict]:
        """Mark pending entries whose lease has passed "abandoned" and delete their partial folders; returns
        them. `register` runs this first; it is safe to run any time (a live writer's claim is in its lease)."""
        retired = []
        for e in self.backend.entries():
            if not _lease_expired(e):
                continue
            try:
                retired.append(
                    self.backend.set_status(e["subject"], e["version"], "abandoned", expect="pending")
                )
            except PreconditionFailed:
                continue  # published, failed or retired by someone else meanwhile
            storage.delete_prefix(e["uri"])
        return retired

    # writing

    def register(
        self,
        *,
        subject: str,
        model_dir: str,
        identifier: str,
        class_noun: str,
        base_model: str,
        base_model_digest: str,
        metrics: dict | None,
        gate: dict | None,
        lineage: dict,
        reference: dict | None = None,
        report_html: str | None = None,
        sample_grid: list[str] | None = None,
        train_config: dict | None = None,
        data_manifest: dict | None = None,
        license_note: str | None = None,
        require_gate: bool = True,
    ) -> RegisteredModel:
        """Add `model_dir` as the next version of `subject`. Refused (nothing written) when the gate failed
        (GateFailed; pass require_gate=False to register it anyway, recorded as failed) or when another
        subject on the same base model already uses `identifier` (DreamboothError)."""
        _check_subject(subject)
        if not identifier or not identifier.strip():
            raise ConfigError(
                f"{subject}: empty identifier; register the identifier the model was trained with"
            )
        if gate is not None and not gate.get("passed") and require_gate:
            reasons = [str(r) for r in gate.get("reasons") or []] or ["no reason recorded"]
            raise GateFailed(
                f"{subject}: not registered, the quality gate failed: {'; '.join(reasons)}. Improve the "
                "model (more steps, better photos) or relax eval.gate; the run's artifacts are kept"
            )
        model_files = storage.list_files(model_dir)
        if not model_files:
            raise StorageError(
                f"{model_dir}: no model files; point model_dir at the trained model folder (train/model)"
            )
        mode = "lora" if any(storage.basename(f) == LORA_WEIGHTS_NAME for f in model_files) else "full"

        def check_identifier(entries: list[dict]) -> None:
            key = base_model_digest or base_model
            for e in entries:
                if (
                    e["identifier"] == identifier
                    and e["subject"] != subject
                    and _holds_identifier(e)
                    and _identifier_key(e) == key
                ):
                    raise DreamboothError(
                        f"{subject}: identifier {identifier!r} is already used by subject {e['subject']!r} "
                        f"(v{e['version']}) on base model {base_model}; retrain with another identifier "
                        f"(`dreambooth identifier --registry {self.root}` excludes the used ones)"
                    )

        self.retire_abandoned()
        check_identifier(self.backend.entries())  # fail fast, before reading the weights; re-checked in claim
        model_digest = storage.digest_prefix(model_dir)
        # what makes two registrations the same one: the weights and everything recorded about them
        registration_digest = _json_digest(
            {
                "model": model_digest,
                "identifier": identifier,
                "base_model": [base_model, base_model_digest],
                "metrics": metrics,
                "reference": reference,
                "gate": gate,
                "lineage": lineage,
                "train_config": train_config,
                "data_manifest": data_manifest,
            }
        )
        for e in self.backend.entries():  # the same registration again (a retried task): the version it made
            if (
                e.get("status") == "ready"
                and e["subject"] == subject
                and e.get("registration_digest") == registration_digest
            ):
                return RegisteredModel.model_validate(e)
        summary = {k: (metrics or {}).get(k) for k, _, _ in METRICS} if metrics is not None else None
        draft = {
            "subject": subject,
            "identifier": identifier,
            "class_noun": class_noun,
            "base_model": base_model,
            "base_model_digest": base_model_digest,
            "mode": mode,
            "registration_digest": registration_digest,
            "metrics": summary,
            "gate_passed": None if gate is None else bool(gate.get("passed")),
        }
        entry = self.backend.claim(draft, check_identifier)
        uri = entry["uri"]
        files = {
            "model_uri": storage.join(uri, MODEL_FOLDER),
            "card_uri": storage.join(uri, CARD_NAME),
            "lineage_uri": storage.join(uri, LINEAGE_NAME),
            "report_uri": storage.join(uri, REPORT_NAME) if report_html else None,
        }
        entry.update(files)
        try:
            storage.copy_prefix(model_dir, entry["model_uri"])
            report_digest = _copy_with_digest(report_html, entry["report_uri"]) if report_html else None
            samples = []
            for i, src in enumerate((sample_grid or [])[:MAX_CARD_SAMPLES]):
                suffix = "." + src.rsplit(".", 1)[-1].lower() if "." in storage.basename(src) else ".png"
                rel = f"{SAMPLES_FOLDER}/{i:02d}{suffix}"
                digest = _copy_with_digest(src, storage.join(uri, *rel.split("/")))
                samples.append({"source_uri": src, "sha256": digest, "path": rel})
            record = {
                "subject": subject,
                "version": entry["version"],
                "created": entry["created"],
                "code_version": dreambooth_lib.__version__,
                "model": {
                    "source_uri": model_dir,
                    "digest": model_digest,
                    "uri": entry["model_uri"],
                    "mode": mode,
                },
                "base_model": {"uri": base_model, "digest": base_model_digest},
                "identifier": identifier,
                "class_noun": class_noun,
                "report_html": {"source_uri": report_html, "sha256": report_digest} if report_html else None,
                "samples": samples,
                "metrics": metrics,
                "reference": reference,
                "gate": gate,
                "train_config": train_config,
                "data_manifest": {"sha256": _json_digest(data_manifest), "content": data_manifest}
                if data_manifest is not None
                else None,
                "inputs": lineage,
            }
            storage.write_json(entry["lineage_uri"], record)
            card = render_model_card(
                entry,
                metrics=metrics,
                reference=reference or {},
                gate=gate,
                samples=[s["path"] for s in samples],
                train_config=train_config,
                data_manifest=data_manifest,
                license_note=license_note or DEFAULT_LICENSE_NOTE,
                model_digest=model_digest,
            )
            storage.write_text(entry["card_uri"], card)
            try:
                entry = self.backend.set_status(subject, entry["version"], "ready", files, expect="pending")
            except PreconditionFailed:
                raise StorageError(
                    f"{uri}: this registration outlived its claim's lease (lease_expires in {INDEX_NAME}) and "
                    "another writer retired it (status 'abandoned'); register again"
                ) from None
        except BaseException:
            # Retire the number and remove the partial folder; the claim itself stays as a record.
            try:
                self.backend.set_status(subject, entry["version"], "failed", expect="pending")
            except PreconditionFailed:
                pass  # already retired by another writer
            finally:
                storage.delete_prefix(uri)
            raise
        return RegisteredModel.model_validate(entry)


def _check_subject(subject: str) -> None:
    if not re.match(SUBJECT_NAME_PATTERN, subject or "") or subject.startswith(INDEX_NAME):
        raise ConfigError(
            f"subject {subject!r}: use a slug of lowercase letters, digits, '_', '-', '.' "
            "(e.g. 'dog' or 'red-backpack')"
        )


def _copy_with_digest(src: str, dst: str) -> str:
    data = storage.read_bytes(src)
    storage.write_bytes(dst, data)
    return storage.sha256_bytes(data)


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --- the model card -----------------------------------------------------------------------------------------


def _code(text: Any) -> str:
    """An inline code span; backticks inside would end it early."""
    return "`" + str(text).replace("`", "'") + "`"


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
) -> str:
    """model_card.md: Hugging Face model-card front matter and the sections a user of the model needs."""
    subject, version = entry["subject"], entry["version"]
    identifier, class_noun, base_model = entry["identifier"], entry["class_noun"], entry["base_model"]
    prompt = f"a {identifier} {class_noun}"
    lora = entry["mode"] == "lora"
    front = {
        "base_model": base_model,
        "library_name": "diffusers",
        "license": "other",
        "license_note": license_note,
        "instance_prompt": prompt,
        "tags": ["text-to-image", "diffusers", "dreambooth", "lora" if lora else "full-fine-tune"],
        "dreambooth": {
            "subject": subject,
            "version": version,
            "identifier": identifier,
            "class_noun": class_noun,
            "base_model_digest": entry["base_model_digest"],
            "model_digest": model_digest,
            "created": entry["created"],
            "gate_passed": entry.get("gate_passed"),
        },
    }
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += [
        f"# {subject} v{version}: DreamBooth {'LoRA' if lora else 'fine-tune'} of {_code(base_model)}",
        "",
    ]
    out += [
        "## Identifier and class",
        "",
        f"- identifier: {_code(identifier)} (a rare token bound to this subject)",
        f"- class: {_code(class_noun)}",
        f"- base model: {_code(base_model)} (digest {_code(entry['base_model_digest'] or 'unknown')})",
        f"- weights: {_code(entry['model_uri'])} ({'LoRA adapter' if lora else 'full diffusers pipeline'})",
        "",
        "## How to prompt",
        "",
        f"Put the identifier before the class noun: {_code(prompt)}, e.g. {_code(prompt + ' on the beach')}.",
        "",
        "```python",
        "from dreambooth_lib.models import load_pipeline  # local folders and gs:// prefixes",
        "",
        f"pipe = load_pipeline({json.dumps(entry['model_uri'])})",
        f"image = pipe({json.dumps(prompt + ' on the beach')}, num_inference_steps=25).images[0]",
        "```",
        "",
        "With diffusers alone, after copying the `model/` folder locally:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
    ]
    if lora:
        out += [
            f"pipe = DiffusionPipeline.from_pretrained({json.dumps(base_model)})",
            'pipe.load_lora_weights("model")',
        ]
    else:
        out += ['pipe = DiffusionPipeline.from_pretrained("model")']
    out += [f"image = pipe({json.dumps(prompt + ' on the beach')}).images[0]", "```", ""]

    out += ["## Metrics", ""]
    if metrics is None:
        out += ["Not evaluated.", ""]
    else:
        out += [
            "| metric | better | this model | real images (ceiling) | paper: DreamBooth (SD) "
            "| paper: real images |",
            "|---|---|---|---|---|---|",
        ]
        for key, label, better in METRICS:
            cells = [
                metrics.get(key),
                reference.get(key),
                PAPER_SD_DREAMBOOTH.get(key),
                PAPER_REAL_IMAGES.get(key),
            ]
            out.append(f"| {label} | {better} | " + " | ".join(format_value(v) for v in cells) + " |")
        out += [
            "",
            "Real images (ceiling): the subject's real photos scored against each other. "
            "Paper: Ruiz et al. 2023, Table 1.",
            "",
        ]
    if gate is None:
        out += ["Quality gate: not evaluated.", ""]
    else:
        verdict = "passed" if gate.get("passed") else "failed (registered with require_gate=False)"
        out += [f"Quality gate: {verdict}."]
        out += [f"- {r}" for r in gate.get("reasons") or []]
        out += [""]
    if entry.get("report_uri"):
        out += [f"Full report: [{REPORT_NAME}]({REPORT_NAME}).", ""]

    if samples:
        out += ["## Samples", ""]
        out += [f"![sample {i}]({path})" for i, path in enumerate(samples)]
        out += [""]

    out += ["## Training configuration", ""]
    if train_config:
        out += ["```yaml", yaml.safe_dump(train_config, sort_keys=False).rstrip(), "```", ""]
    else:
        out += ["Not recorded.", ""]

    out += ["## Data", ""]
    if data_manifest is None:
        out += ["No data manifest was recorded.", ""]
    else:
        out += [f"Data manifest sha256 (canonical JSON): {_code(_json_digest(data_manifest))}", ""]
        rows = _manifest_rows(data_manifest)
        if rows:
            out += ["| file | sha256 |", "|---|---|"]
            out += [f"| {_code(name)} | {_code(digest)} |" for name, digest in rows]
            out += [""]

    out += ["## License", "", license_note, ""]
    out += [
        "## Lineage",
        "",
        f"Every input URI and digest, the configs and the code version ({_code(dreambooth_lib.__version__)}) "
        f"are in [{LINEAGE_NAME}]({LINEAGE_NAME}). Registered {entry['created']}.",
        "",
    ]
    return "\n".join(out)


# --- registering a finished run -----------------------------------------------------------------------------


def _sample_images(eval_dir: str, metrics_doc: dict) -> list[str]:
    """Up to MAX_CARD_SAMPLES images, one per prompt first: the per-prompt lists of metrics.json, else a
    round-robin over eval_dir/images/<prompt>/ (the _pres and _base folders are not samples of this model)."""
    groups: list[list[str]] = []
    for p in metrics_doc.get("per_prompt") or []:
        images = [storage.join(eval_dir, *str(r).split("/")) for r in p.get("images") or []]
        if images:
            groups.append(images)
    if not groups:
        by_folder: dict[str, list[str]] = {}
        images_root = storage.join(eval_dir, "images")
        for f in storage.list_files(images_root):
            rel = storage.relative(f, images_root)
            if rel.lower().endswith(IMAGE_SUFFIXES) and not rel.startswith("_"):
                by_folder.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else "", []).append(f)
        groups = [by_folder[k] for k in sorted(by_folder)]
    picked: list[str] = []
    for round_ in range(max((len(g) for g in groups), default=0)):
        picked += [g[round_] for g in groups if round_ < len(g)]
    return picked[:MAX_CARD_SAMPLES]


def _read_json_or_none(uri: str) -> tuple[Any, str | None]:
    if not storage.exists(uri):
        return None, None
    data = storage.read_bytes(uri)
    try:
        return json.loads(data), storage.sha256_bytes(data)
    except json.JSONDecodeError as err:
        raise StorageError(f"{uri}: not valid JSON ({err})") from None


def register_from_dirs(
    registry_uri: str,
    *,
    subject: Any,
    train_dir: str,
    eval_dir: str | None,
    ingest_dir: str,
    class_noun: str | None = None,
    require_gate: bool = True,
    run_config: dict | None = None,
    backend: str = "file",
) -> RegisteredModel:
    """Register the model of a train folder with the evaluation and data it came from.

    Reads train_dir/train_summary.json (identifier, class_noun, base_model, base_model_digest, config,
    model_uri), eval_dir/metrics.json (metrics, reference, gate) and ingest_dir/manifest.json. `subject` is a
    name or a Subject-like object (its .name and .class_noun are used). The weights come from train_dir/model
    when present (KFP hands the train artifact over under a new path), else from the summary's model_uri.
    Without an evaluation (eval_dir None) the model is registered as "not evaluated": require_gate refuses
    failed gates, not missing ones.
    """
    if not isinstance(subject, str):
        class_noun = class_noun or getattr(subject, "class_noun", None)
        subject = subject.name
    summary_uri = storage.join(train_dir, "train_summary.json")
    summary, summary_digest = _read_json_or_none(summary_uri)
    if summary is None:
        raise DreamboothError(
            f"{summary_uri}: not found; register a finished training run (its train/ folder)"
        )
    missing = [k for k in ("identifier", "base_model") if not summary.get(k)]
    if missing:
        raise DreamboothError(f"{summary_uri}: missing {', '.join(missing)}; re-run training to rewrite it")
    class_noun = class_noun or summary.get("class_noun")
    if not class_noun:
        raise ConfigError(f"{subject}: no class noun given and none in {summary_uri}; pass class_noun")

    local_model = storage.join(train_dir, MODEL_FOLDER)
    model_dir = local_model if storage.is_dir(local_model) else summary.get("model_uri")
    if not model_dir or not storage.is_dir(model_dir):
        raise StorageError(f"{train_dir}: no model folder (model/ or the summary's model_uri {model_dir!r})")

    metrics = reference = gate = None
    metrics_uri = metrics_digest = report = None
    samples: list[str] = []
    if eval_dir is not None:
        metrics_uri = storage.join(eval_dir, "metrics.json")
        doc, metrics_digest = _read_json_or_none(metrics_uri)
        if doc is None:
            raise DreamboothError(
                f"{metrics_uri}: not found; run the evaluation first or register without eval_dir"
            )
        if not isinstance(doc.get("gate"), dict) or "passed" not in doc["gate"]:
            raise DreamboothError(
                f"{metrics_uri}: no gate verdict ('gate': {{'passed': ..., 'reasons': [...]}})"
            )
        metrics, reference, gate = doc.get("metrics") or {}, doc.get("reference") or {}, doc["gate"]
        report_uri = storage.join(eval_dir, REPORT_NAME)
        report = report_uri if storage.exists(report_uri) else None
        samples = _sample_images(eval_dir, doc)

    manifest_uri = storage.join(ingest_dir, "manifest.json")
    manifest, manifest_digest = _read_json_or_none(manifest_uri)
    lineage = {
        "train_summary": {"uri": summary_uri, "sha256": summary_digest},
        "eval_metrics": {"uri": metrics_uri, "sha256": metrics_digest} if metrics_uri else None,
        "ingest_manifest": {"uri": manifest_uri, "sha256": manifest_digest} if manifest is not None else None,
        "instance_images": {"uri": ingest_dir, "digest": storage.digest_prefix(ingest_dir)},
        "run_config": run_config,
    }
    return open_registry(registry_uri, backend=backend).register(
        subject=subject,
        model_dir=model_dir,
        identifier=summary["identifier"],
        class_noun=class_noun,
        base_model=summary["base_model"],
        base_model_digest=summary.get("base_model_digest") or "",
        metrics=metrics,
        gate=gate,
        lineage=lineage,
        reference={k: reference.get(k) for k in ("dino", "clip_i")} if reference else None,
        report_html=report,
        sample_grid=samples,
        train_config=summary.get("config"),
        data_manifest=manifest,
        require_gate=require_gate,
    )
