"""Synthetic photos and broken files for the ingest tests: each function returns the bytes of one kind of file."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo_array(seed: int, width: int = 300, height: int = 300) -> np.ndarray:
    """A textured RGB picture (smooth colour waves, a few blobs, grain): distinct seeds look unrelated to pHash."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 4, 2) * 2 * np.pi / max(width, height)
            img[..., c] += rng.uniform(20, 50) * np.sin(fx * x + fy * y + rng.uniform(0, 2 * np.pi))
    img += 128
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 60)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def photo(seed: int, width: int = 300, height: int = 300) -> Image.Image:
    return Image.fromarray(photo_array(seed, width, height))


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg(seed: int, width: int = 300, height: int = 300, quality: int = 92) -> bytes:
    return encode(photo(seed, width, height), "JPEG", quality=quality)


def png(seed: int, width: int = 300, height: int = 300) -> bytes:
    return encode(photo(seed, width, height), "PNG")


def html_page() -> bytes:
    """What a browser's 'save image' sometimes writes: the page around the image."""
    return b"<!DOCTYPE html>\n<html><head><title>dog.jpg (300x300)</title></head><body><img src=x></body></html>\n"


def truncated_jpeg(seed: int) -> bytes:
    """A download cut off half way: a valid header, half the entropy-coded data, no end marker."""
    data = jpeg(seed)
    return data[: len(data) // 2]


def near_copy(seed: int) -> bytes:
    """The same photo re-saved: resized by 90% and re-encoded as a lower-quality JPEG."""
    im = photo(seed)
    return encode(im.resize((270, 270), Image.Resampling.BILINEAR), "JPEG", quality=60)


def shifted_crops(seed: int, side: int = 300, shift: int = 80) -> tuple[bytes, bytes]:
    """Two crops of one wider photo, `shift` px apart: one shot, framed twice."""
    wide = photo(seed, side + shift, side)
    return encode(wide.crop((0, 0, side, side))), encode(wide.crop((shift, 0, side + shift, side)))


def cmyk_jpeg(seed: int) -> bytes:
    return encode(photo(seed).convert("CMYK"), "JPEG", quality=92)


def palette_png(seed: int) -> bytes:
    return encode(photo(seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=64))


def rgba_png(seed: int) -> bytes:
    """The left third fully transparent (black under the alpha): it must come out white, not black."""
    im = photo(seed).convert("RGBA")
    alpha = np.full((300, 300), 255, dtype=np.uint8)
    alpha[:, :100] = 0
    arr = np.asarray(im).copy()
    arr[:, :100, :3] = 0
    arr[..., 3] = alpha
    return encode(Image.fromarray(arr, "RGBA"))


def la_png(seed: int) -> bytes:
    im = photo(seed).convert("L")
    alpha = Image.new("L", im.size, 255)
    alpha.paste(0, (0, 0, 100, 300))
    return encode(Image.merge("LA", (im, alpha)))


def gray16_png(seed: int) -> bytes:
    """A 16-bit greyscale PNG (mode I;16), as scanners and scientific cameras write."""
    gray = np.asarray(photo(seed).convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(gray))  # uint16 -> mode I;16


def rgb16_png(seed: int) -> bytes:
    """A 16-bit-per-channel RGB PNG, written chunk by chunk (Pillow cannot write one; it reads it as 8-bit)."""
    arr = photo_array(seed).astype(np.uint16) * 257
    height, width, _ = arr.shape
    raw = b"".join(b"\x00" + arr[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def rotated_jpeg(width: int = 400, height: int = 300) -> bytes:
    """Stored landscape with a red left half, EXIF orientation 6: shown upright it is portrait, red on top."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:] = (30, 30, 220)
    arr[:, : width // 2] = (220, 30, 30)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())
