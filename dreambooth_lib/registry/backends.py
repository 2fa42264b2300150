"""Registry backends: the bookkeeping of which versions exist, claimed atomically, and the table that
`open_registry` picks one from.

`Registry` does the validation, the files and the card; a `RegistryBackend` does the bookkeeping (entries,
atomic claims, status changes). `FileRegistryBackend` keeps index.json beside the files. Another catalogue
plugs in by implementing the four methods and registering a factory:

    register_backend("vertex", lambda uri: VertexBackend(uri))   # then open_registry(uri, backend="vertex")

e.g. a Vertex AI Model Registry backend would claim with `Model.upload(parent_model=..., artifact_uri=<version
uri>, labels={"status": "pending"})` and publish by updating labels/aliases; an MLflow backend would create a
`ModelVersion` with tags for the status. The files still go to `version_uri(...)` via dreambooth_lib.storage.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from dreambooth_lib import storage
from dreambooth_lib.artifacts import REGISTRY_INDEX_NAME as INDEX_NAME
from dreambooth_lib.errors import ConfigError, PreconditionFailed, StorageError
from dreambooth_lib.registry.entries import PENDING_LEASE_S, Status, lease_end, now
from dreambooth_lib.registry.store import Registry

# GCS read-modify-write retries: full-jitter exponential backoff, ~1 min in all before giving up.
RETRY_BASE_S = 0.02
RETRY_CAP_S = 2.0
RETRY_ATTEMPTS = 40

T = TypeVar("T")


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
    """index.json under the root, updated by conditional writes (GCS generations) or under an flock.

    Each change carries an id recorded in the entry it makes (`claim_id`, `change_id`), so a change is applied
    once even when its write committed but the answer was lost and another writer's change landed on top before
    ours was retried: the retry re-reads the index, finds its id, and returns the entry instead of claiming a
    second version or refusing its own status change.
    """

    def __init__(self, root: str, pending_lease_s: float = PENDING_LEASE_S):
        self.root = str(root).rstrip("/") if storage.is_gcs(root) else str(root)
        self.index_uri = storage.join(self.root, INDEX_NAME)
        self.pending_lease_s = pending_lease_s

    def version_uri(self, subject: str, version: int) -> str:
        return storage.join(self.root, subject, str(version))

    def _read(self) -> tuple[list[dict], int]:
        """The entries and the index's generation (what a conditional write of it must match)."""
        data, generation = storage.read_bytes_with_generation(self.index_uri)
        if data is None:
            return [], generation
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
        return entries, generation

    def entries(self) -> list[dict]:
        return self._read()[0]

    def _update(self, mutate: Callable[[list[dict]], T]) -> T:
        """Read-modify-write of the index; `mutate` edits the list in place and may run more than once."""
        if not storage.is_gcs(self.index_uri):
            with storage.locked(self.index_uri):
                entries, _ = self._read()
                result = mutate(entries)
                storage.write_json(self.index_uri, entries)
                return result
        for attempt in range(RETRY_ATTEMPTS):
            entries, generation = self._read()
            result = mutate(entries)
            try:
                storage.write_json(self.index_uri, entries, if_generation_match=generation)
                return result
            except PreconditionFailed:
                time.sleep(random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt)))
        raise StorageError(
            f"{self.index_uri}: still changing after {RETRY_ATTEMPTS} attempts (too many concurrent "
            "registrations); retry the registration"
        )

    def claim(self, draft: dict, check: Callable[[list[dict]], None]) -> dict:
        subject, claim_id = draft["subject"], uuid.uuid4().hex

        def allocate(entries: list[dict]) -> dict:
            mine = next((e for e in entries if e.get("claim_id") == claim_id), None)
            if mine is not None:
                return mine  # an earlier attempt of this claim committed
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
                "claim_id": claim_id,
            }
            entry["created"] = now()
            entry["lease_expires"] = lease_end(self.pending_lease_s)
            entries.append(entry)
            return entry

        return self._update(allocate)

    def set_status(self, subject, version, status, updates=None, expect=None) -> dict:  # typed in the base
        change_id = uuid.uuid4().hex

        def mark(entries: list[dict]) -> dict:
            for e in entries:
                if e["subject"] == subject and e["version"] == version:
                    if e.get("change_id") == change_id:
                        return e  # an earlier attempt of this change committed
                    if expect is not None and e.get("status") != expect:
                        raise PreconditionFailed(
                            f"{self.index_uri}: {subject} v{version} is {e.get('status')!r}, not {expect!r}"
                        )
                    e.update(updates or {})
                    e["status"] = status
                    e["change_id"] = change_id
                    e[f"{status}_at"] = now()
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
