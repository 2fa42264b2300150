"""The batch plan: each valid manifest entry with its own identifier, and the distinct classes to make priors for.

Identifiers are chosen one after another, each excluding those before it and the registry's, so subjects trained
in parallel on one base model never share one (the registry only learns of an identifier when its subject
registers, too late for the rest of the batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dreambooth_lib import storage
from dreambooth_lib.config import Consent, IdentifierConfig, Subject
from dreambooth_lib.errors import DreamboothError
from dreambooth_lib.runs.batch.manifest import BatchManifest, RejectedEntry
from dreambooth_lib.runs.batch.status import SubjectStatus, rejected_status


class PlannedSubject(BaseModel):
    """A subject ready to train: its entry, its identifier, and what keys the shared prior cache."""

    model_config = ConfigDict(extra="forbid")

    name: str
    class_noun: str
    images: str
    live: bool = False
    kind: Literal["object", "animal", "person"] = "object"
    consent: Consent | None = None  # a person's consent record (the manifest refuses a person without one)
    identifier: str
    base_model_digest: str
    prior_root: str

    def subject(self) -> Subject:
        return Subject.model_validate(self.model_dump(include=set(Subject.model_fields)))

    @classmethod
    def of(cls, subject: PlannedSubject | Mapping[str, Any]) -> PlannedSubject:
        """`subject` as a PlannedSubject (a task hands it over as the JSON mapping of one)."""
        return subject if isinstance(subject, cls) else cls.model_validate(dict(subject))


class ClassItem(BaseModel):
    """One item of the class loop: the class noun and what the prior step needs to find or make its set."""

    class_noun: str
    base_model_digest: str
    prior_root: str


class BatchPlan(BaseModel):
    """The plan: subjects to train (distinct identifiers), entries left out, and the distinct classes."""

    subjects: list[PlannedSubject]
    failed: list[SubjectStatus]
    classes: list[str]
    base_model_digest: str
    prior_root: str


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
    subject excludes every identifier taken before it.
    """
    from dreambooth_lib import identifier, models

    base_config = identifier_config or IdentifierConfig()
    tokenizer = identifier.load_tokenizer(base_model, allow_pickle=allow_pickle)
    others = identifier.piece_tokenizers(base_model, allow_pickle=allow_pickle)
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
            result = identifier.choose_identifier(
                tokenizer, entry.class_noun, config, exclude=used, also_rare_in=others
            )
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
    for s in map(PlannedSubject.of, subjects):
        by_class.setdefault(
            s.class_noun,
            ClassItem(
                class_noun=s.class_noun, base_model_digest=s.base_model_digest, prior_root=s.prior_root
            ),
        )
    return [by_class[noun] for noun in sorted(by_class)]
