"""People as subjects: the consent record a person needs, and the face check that catches an undeclared person.

A subject declared `kind: person` is refused without a consent record (who gave it, when, where the signed record
is kept) before any photo is copied or any GPU is asked for; the record travels with the ingest manifest into the
registry's lineage and the model card. Ingest looks for faces in the photos of a subject declared *not* a person
with OpenCV's Haar cascade, which ships inside the opencv package (no download); without OpenCV installed the
manifest says the photos were not checked, rather than that no face was found.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, Field

from dreambooth_lib.config import PERSON_NEEDS_CONSENT, Consent, parse_config
from dreambooth_lib.errors import ConfigError

SubjectKind = Literal["object", "animal", "person"]
NO_DETECTOR = "not checked: no face detector is installed (opencv-python-headless ships one with the package, no download)"


class SubjectRecord(BaseModel):
    """What the ingest manifest records of who or what is pictured."""

    kind: SubjectKind = "object"
    consent: Consent | None = None
    faces: str = Field(
        description="the face check: 'not checked: ...', 'none found' or 'found in N of M photos'"
    )


def require_consent(kind: str, consent: Consent | dict | None, source: str) -> Consent | None:
    """The subject's consent record, validated; a ConfigError naming `source` for a person without one."""
    if kind not in ("object", "animal", "person"):
        raise ConfigError(f"{source}: subject kind {kind!r}: use object, animal or person")
    record = parse_config(Consent, consent, f"{source}: consent") if consent else None
    if kind == "person" and record is None:
        raise ConfigError(f"{source}: the subject {PERSON_NEEDS_CONSENT}")
    return record


def face_counter() -> Any:
    """A function image -> number of faces OpenCV's frontal-face cascade finds, or None without OpenCV."""
    try:
        import cv2
    except ImportError:
        return None
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def count(image: Image.Image) -> int:
        import numpy as np

        gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
        return len(cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(32, 32)))

    return count


def subject_record(
    kind: str, consent: Consent | None, photos: list[Image.Image]
) -> tuple[SubjectRecord, str | None]:
    """The record for the manifest, and a warning when faces show in a subject not declared a person."""
    count = face_counter()
    if count is None:
        return SubjectRecord(kind=kind, consent=consent, faces=NO_DETECTOR), None
    with_faces = sum(1 for photo in photos if count(photo) > 0)
    faces = f"found in {with_faces} of {len(photos)} photos" if with_faces else "none found"
    warning = None
    if with_faces and kind != "person":
        warning = (
            f"faces found in {with_faces} of {len(photos)} photos of a subject declared kind: {kind}; if it is a "
            "person, declare kind: person with a consent record (given_by, date, reference)"
        )
    return SubjectRecord(kind=kind, consent=consent, faces=faces), warning
