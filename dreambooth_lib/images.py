"""Encoding images as the PNG bytes every step writes (ingest's crops, the prior set, samples, evaluation)."""

from __future__ import annotations

import io
from typing import Any


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG file contents: lossless, so the pixels read back are the pixels written, and with no
    metadata, so equal pixels give equal bytes (a file's digest is a content key)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
