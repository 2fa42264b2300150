"""An index entry: one claimed version of a subject's model, its status and the lease of its writer."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel

# How long a claimed version may stay "pending" before another writer retires it: far above the minutes that
# copying even a full fp32 SD UNet takes, far below "forever" (a crashed writer's identifier is free again after).
PENDING_LEASE_S = 3600

Status = Literal["pending", "ready", "failed", "abandoned"]


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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lease_end(lease_s: float) -> str:
    """The `lease_expires` of a claim made now."""
    return datetime.fromtimestamp(time.time() + lease_s, timezone.utc).isoformat(timespec="seconds")


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def lease_expired(entry: dict, now: datetime | None = None) -> bool:
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


def holds_identifier(entry: dict) -> bool:
    """Published, or being registered by a writer still within its lease."""
    return entry.get("status") == "ready" or (entry.get("status") == "pending" and not lease_expired(entry))


def identifier_key(entry: dict) -> str:
    """Identifiers are unique per base model: its content digest, or its URI when no digest was recorded."""
    return entry.get("base_model_digest") or entry["base_model"]
