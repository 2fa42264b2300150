"""The batch manifest: a JSON/YAML list of subjects, each entry validated alone so a bad one leaves only itself out.

`{"subjects": [...]}` or a bare list, local or gs://. A manifest that cannot be read at all is a ConfigError; a
bad entry is only *rejected*, with a message naming `subjects[i]` and the field, and the other subjects run.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from dreambooth_lib import storage
from dreambooth_lib.config import Subject, load_config_text, parse_config
from dreambooth_lib.errors import ConfigError


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
            entry = _parse_entry(uri, i, item, seen)
        except ConfigError as err:
            rejected.append(RejectedEntry(index=i, name=name, error=str(err)))
            continue
        seen.add(entry.name)
        entries.append(entry)
        indices.append(i)
    return BatchManifest(uri=uri, entries=entries, indices=indices, rejected=rejected, names=names)


def _parse_entry(uri: str, index: int, item: object, seen: set[str]) -> BatchEntry:
    """Entry `index` as a BatchEntry, or a ConfigError naming `subjects[index]` and what is wrong with it."""
    if not isinstance(item, dict):
        raise ConfigError(f"{uri}: subjects[{index}] is not a mapping; give name, class_noun and images")
    entry = parse_config(BatchEntry, item, f"{uri}: subjects[{index}]")
    if entry.name in seen:
        raise ConfigError(
            f"{uri}: subjects[{index}]: name {entry.name!r} appears twice; subject names must be unique"
        )
    return entry
