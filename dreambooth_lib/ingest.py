"""Ingest the subject's photos: decode, normalise to RGB, reject bad files and duplicates, write square NN.png.

DreamBooth learns from 3-5 photos, so one bad photo (a web page saved as .jpg, a half-downloaded file, the same
shot twice) is a large share of the signal. Every file in the source folder is decoded by Pillow, whatever its
extension says; each is either accepted (with the fix-ups that were needed to make it a plain 8-bit RGB image)
or rejected with a reason naming it. Only when the whole set is valid is anything written: the images first,
`manifest.json` last, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import imagehash
import numpy as np

# imagehash.phash imports scipy.fftpack on its first call, and that import adds a warnings filter
# (scipy.special's SpecialFunctionWarning): imported here, the change happens when this module is imported, not
# in the middle of the first `run`, which must leave the process's warning filters as it found them.
import scipy.fftpack  # noqa: F401
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from dreambooth_lib import storage
from dreambooth_lib.artifacts import INGEST_MANIFEST_NAME
from dreambooth_lib.config import Consent, IngestConfig
from dreambooth_lib.consent import SubjectRecord, require_consent, subject_record
from dreambooth_lib.errors import IngestError
from dreambooth_lib.images import png_bytes

MANIFEST_NAME = INGEST_MANIFEST_NAME
OUTPUT_NAME = re.compile(r"^\d{2,}\.png$")
# Files a desktop leaves beside photos; never the user's images.
IGNORED_NAMES = frozenset({MANIFEST_NAME, "Thumbs.db", "desktop.ini"})

# A second near-duplicate test that perceptual hashes miss: the same photo cropped at another offset. DreamBench
# cat/02 and cat/03 are one shot shifted by 28% of the frame; their pHash distance is 34, more than between
# distinct photos of one subject (14-26 across DreamBench), so no pHash threshold separates them. After aligning
# the two crops (phase correlation, at 128 px) their overlap correlates at 0.9995 and its fine detail (the image
# minus its 3x3 mean) at 0.993. Distinct photos: up to 0.89 overall (DreamBench vase/02 vs /04, plain walls) and
# 0.99 for the synthetic test subject (one red square on grey, moved), but at most 0.64 in fine detail, because
# the detail of two different shots (texture, sensor noise) does not line up. Both must be high.
SHIFT_CHECK_SIDE = 128
SHIFT_MIN_OVERLAP = 0.5
SHIFT_MIN_CORRELATION = 0.95
SHIFT_MIN_DETAIL_CORRELATION = 0.9


class IngestedImage(BaseModel):
    """One accepted photo: where it came from, what was done to it and what was written."""

    source: str = Field(description="URI of the source file")
    source_sha256: str
    original_size: tuple[int, int] = Field(
        description="(width, height) as stored in the file, before any fix-up"
    )
    fixups: list[str] = Field(default_factory=list, description="normalisations applied, e.g. exif_transpose")
    file: str = Field(description="output file name inside the ingest folder, e.g. 00.png")
    sha256: str = Field(description="sha256 of the output PNG")
    phash: str = Field(description="perceptual hash (imagehash.phash, hex) of the decoded image")


class Rejection(BaseModel):
    """A source file that was not used, and why."""

    source: str
    reason: str
    duplicate_of: str | None = Field(None, description="the kept file, for exact and near duplicates")


class IngestResult(BaseModel):
    """What `run` produced; written as `manifest.json` beside the images."""

    source: str
    class_noun: str | None = None
    resolution: int
    images: list[IngestedImage]
    rejections: list[Rejection] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    subject: SubjectRecord | None = Field(None, description="its kind, a person's consent, the face check")
    digest: str = Field(
        description="sha256 over the output images' names and sha256: the pipeline's cache key"
    )
    config: IngestConfig


class _Rejected(Exception):
    """Internal: a file cannot be used; the message is the reason."""


class _Decoded:
    """A decoded, normalised photo kept in memory until the whole set has been validated."""

    def __init__(self, source: str, data: bytes, image: Image.Image, original_size, fixups: list[str]):
        self.source = source
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.original_size = original_size
        self.fixups = fixups
        self.square = center_square(image)
        self.phash = _phash(image)
        self.gray = np.asarray(
            self.square.convert("L").resize((SHIFT_CHECK_SIDE, SHIFT_CHECK_SIDE), Image.Resampling.LANCZOS),
            dtype=np.float64,
        )


# --- decoding --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb check at `max_pixels`, as an error, restored afterwards.

    Pillow reads the limit from a module global and only warns below twice the limit; the warning filter is
    made an error here and both are put back on exit so no other caller sees our setting.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in head:
        return "not an image: the content is HTML/XML (a web page saved with an image name?)"
    try:
        data[:512].decode("utf-8")
        return "not an image: the content is text"
    except UnicodeDecodeError:
        return "not an image: Pillow does not recognise the format"


def _is_16bit(im: Image.Image) -> bool:
    """True for files that store 16 bits per sample (Pillow reads 16-bit RGB PNGs as 8-bit RGB silently)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return True
    return any(";16" in str(tile) for tile in im.tile or [])  # the raw mode, e.g. 'RGB;16B', is in the tile


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """I;16 / I / F greyscale to L: 16-bit ranges scale by 1/257, anything already within 0-255 stays."""
    arr = np.asarray(im).astype(np.float64)
    if arr.max(initial=0) > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def normalise(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """An 8-bit RGB image upright as the camera meant it, and the names of the fix-ups that took."""
    fixups: list[str] = []
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1:
        # MPO (phones' multi-picture JPEG: the photo plus a preview or depth frame) and animations: frame 0.
        fixups.append("mpo_first_frame" if im.format == "MPO" else "first_frame")
        im.seek(0)
    sixteen_bit = _is_16bit(im)
    im.load()  # the full decode: a truncated or corrupt file fails here, not later in training
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a mangled EXIF block must not cost a good photo: keep it as stored
        orientation = 1
    if orientation not in (None, 1):
        im = ImageOps.exif_transpose(im)
        fixups.append("exif_transpose")
    if sixteen_bit:
        fixups.append("16bit_to_8bit")
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit_gray(im)
    mode = im.mode
    if mode == "P" or mode == "PA":
        fixups.append("palette_to_rgb")
        if mode == "PA" or "transparency" in im.info:
            im = im.convert("RGBA")
            mode = "RGBA"
        else:
            im = im.convert("RGB")
    elif mode == "CMYK":
        fixups.append("cmyk_to_rgb")
        im = im.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La") or (mode in ("L", "RGB") and "transparency" in im.info):
        fixups.append("alpha_on_white")
        im = _on_white(im)
    elif im.mode in ("L", "1"):
        fixups.append("grayscale_to_rgb")
        im = im.convert("RGB")
    elif im.mode != "RGB":
        fixups.append(f"{im.mode.lower()}_to_rgb")
        im = im.convert("RGB")
    return im, fixups


def decode(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Decode one file fully into (RGB image, stored size, fix-ups); raises _Rejected with the reason."""
    if not data:
        raise _Rejected("empty file (0 bytes)")
    try:
        with _pixel_limit(max_pixels):
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:  # holds even if another thread changed Pillow's global meanwhile
                raise Image.DecompressionBombError(
                    f"Image size ({width}x{height} = {width * height} pixels) exceeds limit of {max_pixels} pixels"
                )
            rgb, fixups = normalise(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _Rejected(
            f"decompression bomb: {str(err).rstrip('.')}; raise ingest.max_pixels if the photo is genuine"
        ) from None
    except UnidentifiedImageError:
        raise _Rejected(_describe_non_image(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _Rejected(
            f"truncated or corrupt image data ({err}); re-export or re-download the photo"
        ) from None
    return rgb, (width, height), fixups


# --- geometry and similarity -----------------------------------------------------------------------------------


def center_square(im: Image.Image) -> Image.Image:
    """The largest centred square: the paper trains on square crops, and the subject is usually central."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def _phash(im: Image.Image) -> imagehash.ImageHash:
    return imagehash.phash(im)


def _fine_detail(gray: np.ndarray) -> np.ndarray:
    """The image minus its 3x3 local mean: texture and edges, without the layout."""
    padded = np.pad(gray, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return gray - windows.mean(axis=(2, 3))


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel(), y.ravel()
    if x.size < 2 or x.std() < 1e-6 or y.std() < 1e-6:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


class ShiftMatch(BaseModel):
    """How well one grey image matches another after the best translation."""

    correlation: float
    detail_correlation: float
    overlap: float = Field(description="overlapping fraction of the image area")
    shift: tuple[int, int] = Field(description="(dy, dx) in pixels of the compared images")


def shifted_copy_match(a: np.ndarray, b: np.ndarray) -> ShiftMatch:
    """Align two equal-size grey images by phase correlation and correlate their overlap.

    Both correlations are ~1 only when one image is a shifted crop of the other.
    """
    n_rows, n_cols = a.shape
    fa, fb = np.fft.fft2(a - a.mean()), np.fft.fft2(b - b.mean())
    cross = fa * np.conj(fb)
    surface = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = (int(v) for v in np.unravel_index(int(np.argmax(surface)), surface.shape))
    dy = dy - n_rows if dy > n_rows // 2 else dy
    dx = dx - n_cols if dx > n_cols // 2 else dx
    ya, xa = slice(max(0, dy), min(n_rows, n_rows + dy)), slice(max(0, dx), min(n_cols, n_cols + dx))
    yb, xb = slice(ya.start - dy, ya.stop - dy), slice(xa.start - dx, xa.stop - dx)
    return ShiftMatch(
        correlation=_correlation(a[ya, xa], b[yb, xb]),
        detail_correlation=_correlation(_fine_detail(a)[ya, xa], _fine_detail(b)[yb, xb]),
        overlap=a[ya, xa].size / a.size,
        shift=(dy, dx),
    )


def _near_duplicate_reason(new: _Decoded, kept: _Decoded, max_distance: int) -> str | None:
    distance = int(new.phash - kept.phash)
    if distance <= max_distance:
        return (
            f"near duplicate of {storage.basename(kept.source)} (perceptual-hash distance {distance} <= "
            f"near_duplicate_distance={max_distance})"
        )
    m = shifted_copy_match(kept.gray, new.gray)
    if (
        m.overlap >= SHIFT_MIN_OVERLAP
        and m.correlation >= SHIFT_MIN_CORRELATION
        and m.detail_correlation >= SHIFT_MIN_DETAIL_CORRELATION
    ):
        dy, dx = (round(100 * abs(v) / SHIFT_CHECK_SIDE) for v in m.shift)
        return (
            f"near duplicate of {storage.basename(kept.source)}: the same photo cropped at another offset "
            f"(shifted {dx}% across, {dy}% down; overlap correlation {m.correlation:.3f}, "
            f"fine detail {m.detail_correlation:.3f})"
        )
    return None


# --- the step --------------------------------------------------------------------------------------------------


def candidate_files(src: str) -> list[str]:
    """Every non-hidden file directly under `src`, sorted: the extension does not decide, decoding does."""
    files = storage.list_files(src, recursive=False)
    return [
        f
        for f in files
        if not storage.basename(f).startswith(".") and storage.basename(f) not in IGNORED_NAMES
    ]


def output_digest(images: list[IngestedImage]) -> str:
    h = hashlib.sha256()
    for img in images:
        h.update(f"{img.file}\0{img.sha256}\n".encode())
    return h.hexdigest()


def _validate(src: str, config: IngestConfig) -> tuple[list[_Decoded], list[Rejection]]:
    """Decode and check every candidate; returns the accepted photos (sorted order) and the rejections."""
    accepted: list[_Decoded] = []
    rejections: list[Rejection] = []
    seen_sha: dict[str, str] = {}
    for uri in candidate_files(src):
        data = storage.read_bytes(uri)
        sha = hashlib.sha256(data).hexdigest()
        if data and sha in seen_sha:
            rejections.append(
                Rejection(
                    source=uri,
                    reason=f"exact duplicate of {storage.basename(seen_sha[sha])} (same bytes)",
                    duplicate_of=seen_sha[sha],
                )
            )
            continue
        try:
            image, original_size, fixups = decode(data, config.max_pixels)
        except _Rejected as why:
            rejections.append(Rejection(source=uri, reason=str(why)))
            continue
        seen_sha[sha] = uri
        short = min(image.size)
        if short < config.min_side:
            rejections.append(
                Rejection(
                    source=uri,
                    reason=f"too small: {image.size[0]}x{image.size[1]}, shorter side {short} px < "
                    f"min_side={config.min_side} (use a larger original, or lower ingest.min_side)",
                )
            )
            continue
        candidate = _Decoded(uri, data, image, original_size, fixups)
        for kept in accepted:
            reason = _near_duplicate_reason(candidate, kept, config.near_duplicate_distance)
            if reason:
                rejections.append(Rejection(source=uri, reason=reason, duplicate_of=kept.source))
                break
        else:
            accepted.append(candidate)
    return accepted, rejections


def _same_folder(a: str, b: str) -> bool:
    """True when two URIs name one folder (writing NN.png there would overwrite the user's photos)."""
    if storage.is_gcs(a) or storage.is_gcs(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _rejection_summary(rejections: list[Rejection]) -> str:
    return "; ".join(f"{storage.basename(r.source)}: {r.reason}" for r in rejections) or "none"


def run(
    src: str,
    out: str,
    config: IngestConfig,
    class_noun: str | None = None,
    subject_kind: str = "object",
    consent: Consent | dict | None = None,
) -> IngestResult:
    """Validate the photos under `src` and write `out/NN.png` (square, `config.resolution`) + `out/manifest.json`.

    Raises IngestError, writing nothing, when fewer than `config.min_images` photos are usable (1 or more are
    enough with `allow_few`, with a warning) or, with `strict`, when any file is rejected; ConfigError, before
    reading anything, for a subject of kind person without a consent record.
    """
    src, out = str(src), str(out)
    consent = require_consent(subject_kind, consent, src)
    if not storage.is_dir(src):
        raise IngestError(f"{src}: no such folder (or empty gs:// prefix); point to the subject's photos")
    if _same_folder(src, out):
        raise IngestError(
            f"{out}: the output folder is the source folder; write the ingested images elsewhere"
        )
    accepted, rejections = _validate(src, config)
    if config.strict and rejections:
        raise IngestError(
            f"{src}: strict mode: {len(rejections)} file(s) rejected: {_rejection_summary(rejections)}; "
            "remove or fix them, or run without strict to skip them"
        )
    warn: list[str] = []
    if len(accepted) < config.min_images:
        detail = f"{len(accepted)} usable image(s), need min_images={config.min_images}; rejected: " + (
            _rejection_summary(rejections)
        )
        if not accepted:
            raise IngestError(f"{src}: no usable images ({detail}); add 3-5 photos of the subject")
        if not config.allow_few:
            raise IngestError(
                f"{src}: too few images: {detail}; add photos (the paper uses 3-5), or set allow_few to go on"
            )
        warn.append(
            f"only {len(accepted)} usable image(s) (min_images={config.min_images}); the subject may be "
            "learnt poorly or overfit"
        )

    width = max(2, len(str(len(accepted) - 1)))
    images: list[IngestedImage] = []
    encoded: list[bytes] = []
    for i, photo in enumerate(accepted):
        name = f"{i:0{width}d}.png"
        side = photo.square.size[0]
        if side < config.resolution:
            warn.append(
                f"{storage.basename(photo.source)}: upscaled from {side} px to {config.resolution} px; "
                "fine detail will be soft"
            )
        square = photo.square.resize((config.resolution, config.resolution), Image.Resampling.LANCZOS)
        png = png_bytes(square)
        encoded.append(png)
        images.append(
            IngestedImage(
                source=photo.source,
                source_sha256=photo.sha256,
                original_size=photo.original_size,
                fixups=photo.fixups,
                file=name,
                sha256=hashlib.sha256(png).hexdigest(),
                phash=str(photo.phash),
            )
        )
    record, face_warning = subject_record(subject_kind, consent, [photo.square for photo in accepted])
    warn += [face_warning] if face_warning else []
    result = IngestResult(
        source=src,
        class_noun=class_noun,
        resolution=config.resolution,
        images=images,
        rejections=rejections,
        warnings=warn,
        subject=record,
        digest=output_digest(images),
        config=config,
    )
    _write(out, images, encoded, result)
    return result


def _write(out: str, images: list[IngestedImage], encoded: list[bytes], result: IngestResult) -> None:
    """Old manifest out first, images in, stale NN.png out, new manifest last: a manifest means a whole set."""
    manifest_uri = storage.join(out, MANIFEST_NAME)
    storage.delete(manifest_uri)
    for img, png in zip(images, encoded, strict=True):
        storage.write_bytes(storage.join(out, img.file), png)
    keep = {img.file for img in images}
    for uri in storage.list_files(out, recursive=False):
        name = storage.basename(uri)
        if OUTPUT_NAME.match(name) and name not in keep:
            storage.delete(uri)
    storage.write_text(manifest_uri, result.model_dump_json(indent=2) + "\n")


def load_manifest(out: str) -> IngestResult:
    """The IngestResult recorded in `out/manifest.json`."""
    uri = storage.join(str(out), MANIFEST_NAME)
    if not storage.exists(uri):
        raise IngestError(f"{out}: no {MANIFEST_NAME}; run `dreambooth ingest SRC {out}` first")
    try:
        return IngestResult.model_validate_json(storage.read_bytes(uri))
    except ValueError as err:
        raise IngestError(f"{uri}: not a valid ingest manifest ({err}); run ingest again") from None


def instance_image_uris(out: str) -> list[str]:
    """URIs of the ingested images of `out`, in manifest order."""
    return [storage.join(str(out), img.file) for img in load_manifest(out).images]
