"""The registry: immutable, numbered versions of personalized models, each with its card and lineage.

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

The files of a version are named in registry.layout; the bookkeeping (index.json, or another catalogue) is a
registry.backends.RegistryBackend.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dreambooth_lib import storage
from dreambooth_lib.artifacts import REGISTRY_INDEX_NAME as INDEX_NAME
from dreambooth_lib.config import SUBJECT_NAME_PATTERN
from dreambooth_lib.errors import ConfigError, DreamboothError, GateFailed, PreconditionFailed, StorageError
from dreambooth_lib.evaluate.report import METRICS
from dreambooth_lib.registry.card import DEFAULT_LICENSE_NOTE, render_model_card
from dreambooth_lib.registry.entries import RegisteredModel, holds_identifier, identifier_key, lease_expired
from dreambooth_lib.registry.layout import MAX_CARD_SAMPLES, sample_path, version_files
from dreambooth_lib.registry.lineage import json_digest, lineage_record
from dreambooth_lib.registry.model_folder import model_family, model_mode

if TYPE_CHECKING:
    from dreambooth_lib.registry.backends import RegistryBackend


@dataclass(frozen=True)
class Registration:
    """What one `Registry.register` call records: the weights and everything known about them."""

    subject: str
    model_dir: str
    identifier: str
    class_noun: str
    base_model: str
    base_model_digest: str
    metrics: dict | None
    gate: dict | None
    lineage: dict
    reference: dict | None = None
    report_html: str | None = None
    sample_grid: list[str] | None = None
    train_config: dict | None = None
    data_manifest: dict | None = None
    license_note: str | None = None

    def __post_init__(self):
        if not re.match(SUBJECT_NAME_PATTERN, self.subject or "") or self.subject.startswith(INDEX_NAME):
            raise ConfigError(
                f"subject {self.subject!r}: use a slug of lowercase letters, digits, '_', '-', '.' "
                "(e.g. 'dog' or 'red-backpack')"
            )
        if not self.identifier or not self.identifier.strip():
            raise ConfigError(
                f"{self.subject}: empty identifier; register the identifier the model was trained with"
            )

    def digest(self, model_digest: str) -> str:
        """What makes two registrations the same one: the weights and everything recorded about them."""
        return json_digest(
            {
                "model": model_digest,
                "identifier": self.identifier,
                "base_model": [self.base_model, self.base_model_digest],
                "metrics": self.metrics,
                "reference": self.reference,
                "gate": self.gate,
                "lineage": self.lineage,
                "train_config": self.train_config,
                "data_manifest": self.data_manifest,
            }
        )

    def draft(self, mode: str, registration_digest: str) -> dict:
        """The index entry to claim (the backend adds the version, its folder, the status and the times)."""
        return {
            "subject": self.subject,
            "identifier": self.identifier,
            "class_noun": self.class_noun,
            "base_model": self.base_model,
            "base_model_digest": self.base_model_digest,
            "mode": mode,
            "registration_digest": registration_digest,
            # the index keeps the paper's metrics only; lineage.json keeps all of them
            "metrics": {k: self.metrics.get(k) for k, _, _ in METRICS} if self.metrics is not None else None,
            "gate_passed": None if self.gate is None else bool(self.gate.get("passed")),
        }


class Registry:
    """Register, list and show models; see the module docstring for the commit protocol."""

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
            if holds_identifier(e) and (base_model_digest is None or identifier_key(e) == base_model_digest)
        }

    def retire_abandoned(self) -> list[dict]:
        """Mark pending entries whose lease has passed "abandoned" and delete their partial folders; returns
        them. `register` runs this first; it is safe to run any time (a live writer's claim is in its lease)."""
        retired = []
        for e in self.backend.entries():
            if not lease_expired(e):
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

    def register(self, *, require_gate: bool = True, **fields: Any) -> RegisteredModel:
        """Add a model folder as the next version of its subject; `fields` are a `Registration`'s (subject,
        model_dir, identifier, class_noun, base_model, base_model_digest, metrics, gate, lineage, and optionally
        reference, report_html, sample_grid, train_config, data_manifest, license_note). Refused (nothing
        written) when the gate failed (GateFailed; pass require_gate=False to register it anyway, recorded as
        failed) or when another subject on the same base model already uses the identifier (DreamboothError)."""
        registration = Registration(**fields)
        subject, model_dir = registration.subject, registration.model_dir
        if require_gate:
            _refuse_failed_gate(subject, registration.gate)
        model_files = storage.list_files(model_dir)
        if not model_files:
            raise StorageError(
                f"{model_dir}: no model files; point model_dir at the trained model folder (train/model)"
            )
        check_identifier = functools.partial(self._refuse_used_identifier, registration)
        self.retire_abandoned()
        check_identifier(self.backend.entries())  # fail fast, before reading the weights; re-checked in claim
        model_digest = storage.digest_prefix(model_dir)
        registration_digest = registration.digest(model_digest)
        published = self._published(subject, registration_digest)
        if published is not None:
            return published  # the same registration again (a retried task): the version it made
        entry = self.backend.claim(
            registration.draft(model_mode(model_files), registration_digest), check_identifier
        )
        files = version_files(entry["uri"], with_report=bool(registration.report_html))
        entry.update(files)
        try:
            self._write_version(entry, registration, model_digest)
            entry = self._publish(entry, files)
        except BaseException:
            self._retire_failed(entry)
            raise
        return RegisteredModel.model_validate(entry)

    def _refuse_used_identifier(self, registration: Registration, entries: list[dict]) -> None:
        """Raise when another subject on the same base model holds the registration's identifier."""
        r = registration
        key = r.base_model_digest or r.base_model
        for e in entries:
            if (
                e["identifier"] == r.identifier
                and e["subject"] != r.subject
                and holds_identifier(e)
                and identifier_key(e) == key
            ):
                raise DreamboothError(
                    f"{r.subject}: identifier {r.identifier!r} is already used by subject {e['subject']!r} "
                    f"(v{e['version']}) on base model {r.base_model}; retrain with another identifier "
                    f"(`dreambooth identifier --registry {self.root}` excludes the used ones)"
                )

    def _published(self, subject: str, registration_digest: str) -> RegisteredModel | None:
        """The published version of `subject` that this same registration made, if any."""
        for e in self.backend.entries():
            if (
                e.get("status") == "ready"
                and e["subject"] == subject
                and e.get("registration_digest") == registration_digest
            ):
                return RegisteredModel.model_validate(e)
        return None

    def _write_version(self, entry: dict, registration: Registration, model_digest: str) -> None:
        """Into the claimed version's folder: the weights, the report, the samples, lineage.json, the card."""
        r = registration
        storage.copy_prefix(r.model_dir, entry["model_uri"])
        report_digest = _copy_with_digest(r.report_html, entry["report_uri"]) if r.report_html else None
        samples = []
        for i, source in enumerate((r.sample_grid or [])[:MAX_CARD_SAMPLES]):
            path = sample_path(i, source)
            digest = _copy_with_digest(source, storage.join(entry["uri"], *path.split("/")))
            samples.append({"source_uri": source, "sha256": digest, "path": path})
        record = lineage_record(
            entry, r, model_digest=model_digest, report_digest=report_digest, samples=samples
        )
        storage.write_json(entry["lineage_uri"], record)
        card = render_model_card(
            entry,
            metrics=r.metrics,
            reference=r.reference or {},
            gate=r.gate,
            samples=[s["path"] for s in samples],
            train_config=r.train_config,
            data_manifest=r.data_manifest,
            license_note=r.license_note or DEFAULT_LICENSE_NOTE,
            model_digest=model_digest,
            family=model_family(r.model_dir, entry["mode"], r.base_model),
        )
        storage.write_text(entry["card_uri"], card)

    def _publish(self, entry: dict, files: dict) -> dict:
        """Mark the claimed entry "ready" with its files; refused when its lease ran out meanwhile."""
        try:
            return self.backend.set_status(
                entry["subject"], entry["version"], "ready", files, expect="pending"
            )
        except PreconditionFailed:
            raise StorageError(
                f"{entry['uri']}: this registration outlived its claim's lease (lease_expires in {INDEX_NAME}) "
                "and another writer retired it (status 'abandoned'); register again"
            ) from None

    def _retire_failed(self, entry: dict) -> None:
        """Retire the number and remove the partial folder; the claim itself stays as a record."""
        try:
            self.backend.set_status(entry["subject"], entry["version"], "failed", expect="pending")
        except PreconditionFailed:
            pass  # already retired by another writer
        finally:
            storage.delete_prefix(entry["uri"])


def _refuse_failed_gate(subject: str, gate: dict | None) -> None:
    if gate is not None and not gate.get("passed"):
        reasons = [str(r) for r in gate.get("reasons") or []] or ["no reason recorded"]
        raise GateFailed(
            f"{subject}: not registered, the quality gate failed: {'; '.join(reasons)}. Improve the "
            "model (more steps, better photos) or relax eval.gate; the run's artifacts are kept"
        )


def _copy_with_digest(src: str, dst: str) -> str:
    data = storage.read_bytes(src)
    storage.write_bytes(dst, data)
    return storage.sha256_bytes(data)
