"""GCS objects, each request retried under the storage retry policy: verified downloads, uploads that know
whether a lost answer committed, paged listings, server-side copies, deletes.

Every library call is made with `retry=None` and the policy's timeout: the retrying is done here, once, so its
counts and limits are ours. Three cases need more than "try again":
- a download is checked against the object's stored CRC32C (or MD5), as the answer's x-goog-hash gives it for the
  generation read: a mismatch is retried, never returned;
- an upload whose answer was lost (a reset, a timeout, a 5xx) may still have committed. Retrying an unconditional
  upload writes the same bytes again, which is harmless; a conditional one (`if_generation_match`) would fail its
  own precondition, so it carries a write id in its metadata and a 412 after a lost answer is checked against it:
  the object holding our id is our write, reported as a success, never as a conflict and never written twice;
- a large upload goes in chunks over a resumable session; a failed chunk restarts the session (fake-gcs-server
  finalizes an upload on a status query, so resuming mid-session cannot be tested against it).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

from dreambooth_lib.errors import PreconditionFailed, StorageError
from dreambooth_lib.storage.retry import TransientError, count, current_policy, with_retries

GCS_PREFIX = "gs://"
WRITE_ID_KEY = "dreambooth-write-id"  # object metadata: which conditional write made this generation


def split_gcs(uri: str) -> tuple[str, str]:
    if not uri.startswith(GCS_PREFIX):
        raise StorageError(f"{uri}: not a gs:// URI")
    rest = uri[len(GCS_PREFIX) :]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; use gs://BUCKET/path")
    return bucket, name


@lru_cache(maxsize=1)
def client():
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials()
        )
    return gcs.Client()


def blob(uri: str):
    """A fresh blob handle (no cached metadata: its media link would bypass the endpoint the client uses)."""
    bucket, name = split_gcs(uri)
    if not name:
        raise StorageError(f"{uri}: names a bucket, not an object")
    return client().bucket(bucket).blob(name)


@contextlib.contextmanager
def errors_named(uri: str) -> Iterator[None]:
    """The client's exceptions a user can cause, as our errors naming `uri` and the fix."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except gexc.PreconditionFailed as err:
        raise PreconditionFailed(
            f"{uri}: changed by another writer (generation precondition failed)"
        ) from err
    except gexc.NotFound as err:
        raise StorageError(f"{uri}: not found (check the bucket and path)") from err
    except gexc.Forbidden as err:
        raise StorageError(
            f"{uri}: permission denied; grant the service account access to the bucket"
        ) from err


def _timeout() -> float:
    return current_policy().request_timeout_s


# --- metadata ----------------------------------------------------------------------------------------------------


def metadata(uri: str):
    """The object's metadata (generation, size, crc32c, md5_hash, metadata), or None when it does not exist."""
    from google.api_core import exceptions as gexc

    def attempt():
        b = blob(uri)
        try:
            b.reload(timeout=_timeout(), retry=None)
        except gexc.NotFound:
            return None
        return b

    with errors_named(uri):
        return with_retries(uri, "reading metadata", attempt)


def bucket_exists(uri: str) -> bool:
    bucket, _ = split_gcs(uri)
    with errors_named(uri):
        return with_retries(
            uri, "checking the bucket", lambda: client().bucket(bucket).exists(timeout=_timeout(), retry=None)
        )


# --- listing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing."""

    uri: str
    name: str
    size: int
    crc32c: str | None
    md5_hash: str | None


def list_objects(
    uri: str, prefix: str, delimiter: str | None = None, limit: int | None = None
) -> list[ObjectInfo]:
    """Objects of `uri`'s bucket whose names start with `prefix`, page by page, each page retried on its own
    (a listing of many thousand objects does not start over for one failed page)."""
    bucket, _ = split_gcs(uri)
    page_size = min(current_policy().list_page_size, limit or current_policy().list_page_size)
    found: list[ObjectInfo] = []
    token: str | None = None

    def one_page(page_token: str | None) -> tuple[list, str | None]:
        pages = client().list_blobs(
            bucket,
            prefix=prefix,
            delimiter=delimiter,
            page_size=page_size,
            page_token=page_token,
            timeout=_timeout(),
            retry=None,
        )
        page = next(pages.pages, None)
        return (list(page) if page is not None else []), pages.next_page_token

    with errors_named(uri):
        while True:
            blobs, token = with_retries(uri, "listing", lambda t=token: one_page(t))
            found += [
                ObjectInfo(f"{GCS_PREFIX}{bucket}/{b.name}", b.name, int(b.size or 0), b.crc32c, b.md5_hash)
                for b in blobs
            ]
            if not token or (limit is not None and len(found) >= limit):
                return found[:limit] if limit is not None else found


# --- downloading -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One range of an object as a media GET returned it, with what the headers say of the whole object."""

    data: bytes
    generation: int
    size: int  # of the whole object
    hashes: dict[str, str]  # x-goog-hash: the object's stored "crc32c" and "md5", base64


def download(uri: str, new_sink: Callable[[], IO[bytes]]) -> tuple[IO[bytes], int]:
    """Read the object into a sink from `new_sink()` (a fresh one per attempt) and check the whole against the
    object's stored CRC32C (or MD5); (the sink, the generation). The object is read in ranges, each retried on its
    own; the first range's answer names the generation, which the others are pinned to, and the checksums (GCS
    sends them with every media answer, so they always describe the bytes being read)."""
    import hashlib

    import google_crc32c

    step = current_policy().download_range_bytes

    def whole_object() -> tuple[IO[bytes], int]:
        sink, crc, md5 = new_sink(), google_crc32c.Checksum(), hashlib.md5()
        try:
            first = with_retries(
                uri, f"download of bytes 0-{step - 1}", lambda: _media(uri, None, 0, step - 1)
            )
            pieces = [first.data]
            for start in range(len(first.data), first.size, step):
                end = min(first.size, start + step) - 1
                pieces.append(
                    with_retries(
                        uri,
                        f"download of bytes {start}-{end}",
                        lambda s=start, e=end: _media(uri, first.generation, s, e).data,
                    )
                )
            for piece in pieces:
                sink.write(piece)
                crc.update(piece)
                md5.update(piece)
            if "crc32c" in first.hashes:
                want, got, kind = first.hashes["crc32c"], base64.b64encode(crc.digest()).decode(), "CRC32C"
            else:  # every GCS object has a CRC32C (a composite one no MD5); the fallback is for emulators
                want, got, kind = first.hashes.get("md5"), base64.b64encode(md5.digest()).decode(), "MD5"
            if want and got != want:
                count("checksum mismatch")
                raise TransientError(f"checksum mismatch: {kind} {got} read, the object's is {want}")
        except BaseException:
            getattr(sink, "close", lambda: None)()  # a file sink of a failed attempt
            raise
        return sink, first.generation

    with errors_named(uri):
        return with_retries(uri, "verified download", whole_object)


def _media(uri: str, generation: int | None, start: int, end: int) -> _Piece:
    """Bytes start..end of the object (of `generation`, when given), as stored: no transcoding, no decoding."""
    from urllib.parse import quote

    from google.api_core import exceptions as gexc

    bucket, name = split_gcs(uri)
    url = f"{client()._connection.API_BASE_URL}/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media"
    if generation is not None:
        url += f"&generation={generation}"
    headers = {
        "Range": f"bytes={start}-{end}",
        "Accept-Encoding": "gzip",
    }  # gzip: the stored bytes, as hashed
    with client()._http.get(url, headers=headers, stream=True, timeout=_timeout()) as response:
        if response.status_code == 416:  # no byte 0: an empty object, described by its metadata
            meta = metadata(uri)
            if meta is None:
                raise gexc.NotFound(f"{uri}: deleted while read")
            return _Piece(b"", int(meta.generation), 0, {"crc32c": meta.crc32c} if meta.crc32c else {})
        if response.status_code not in (200, 206):
            response.content  # noqa: B018 - the error's message is in the body
            err = gexc.from_http_response(response)
            if generation is not None and response.status_code == 404:
                raise TransientError(f"replaced while read: generation {generation} is gone ({err})") from err
            raise err
        data = response.raw.read(decode_content=False)
        headers = response.headers
    total = headers.get("Content-Range", "").rsplit("/", 1)[-1]
    hashes = dict(h.strip().split("=", 1) for h in headers.get("x-goog-hash", "").split(",") if "=" in h)
    return _Piece(
        data=data,
        generation=int(headers.get("x-goog-generation") or generation or 0),
        size=int(total) if response.status_code == 206 and total.isdigit() else len(data),
        hashes=hashes,
    )


def read_bytes(uri: str) -> tuple[bytes, int]:
    sink, generation = download(uri, io.BytesIO)
    return sink.getvalue(), generation


# --- uploading ---------------------------------------------------------------------------------------------------


def upload(uri: str, source: bytes | str, if_generation_match: int | None = None) -> int:
    """Write `source` (bytes, or a local file's path) to `uri`; its new generation. With `if_generation_match`
    (0: must not exist), PreconditionFailed when another writer got there first."""
    from google.api_core import exceptions as gexc

    size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    conditional = if_generation_match is not None
    write_id = uuid.uuid4().hex if conditional else None
    answer_lost = False  # an earlier attempt may have committed without our hearing so

    def attempt() -> int:
        nonlocal answer_lost
        try:
            with _opened(source) as stream:
                return _upload_once(uri, stream, size, if_generation_match, write_id)
        except gexc.PreconditionFailed:
            if answer_lost and write_id:
                meta = metadata(uri)
                if meta is not None and (meta.metadata or {}).get(WRITE_ID_KEY) == write_id:
                    count("write recognised")
                    return int(meta.generation)
            raise
        except Exception:
            answer_lost = True
            raise

    with errors_named(uri):
        return with_retries(uri, "upload", attempt)


@contextlib.contextmanager
def _opened(source: bytes | str) -> Iterator[IO[bytes]]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
        return
    with open(source, "rb") as f:
        yield f


def _upload_once(
    uri: str, stream: IO[bytes], size: int, if_generation_match: int | None, write_id: str | None
) -> int:
    policy = current_policy()
    b = blob(uri)
    if write_id:
        b.metadata = {WRITE_ID_KEY: write_id}
    conditions: dict[str, Any] = {}
    if if_generation_match is not None:
        conditions["if_generation_match"] = if_generation_match
    from google.cloud.storage.blob import _MAX_MULTIPART_SIZE  # above it the library itself goes resumable

    if size <= min(policy.multipart_max_bytes, _MAX_MULTIPART_SIZE):
        b.upload_from_file(stream, size=size, timeout=policy.request_timeout_s, retry=None, **conditions)
        return int(b.generation)
    return _upload_resumable(b, stream, size, conditions)


def _upload_resumable(b, stream: IO[bytes], size: int, conditions: dict[str, Any]) -> int:
    """One resumable session, chunk after chunk; any failure raises (the caller retries with a new session)."""
    from google.api_core import exceptions as gexc

    policy = current_policy()
    session = b.create_resumable_upload_session(
        size=size, timeout=policy.request_timeout_s, checksum=None, retry=None, **conditions
    )
    http = client()._http
    offset = 0
    while True:
        stream.seek(offset)
        piece = stream.read(policy.chunk_bytes)
        content_range = f"bytes {offset}-{offset + len(piece) - 1}/{size}" if piece else f"bytes */{size}"
        response = http.put(
            session, data=piece, headers={"Content-Range": content_range}, timeout=policy.request_timeout_s
        )
        if response.status_code in (200, 201):
            return int(response.json()["generation"])
        if response.status_code != 308:
            raise gexc.from_http_response(response)
        persisted = response.headers.get("Range")  # "bytes=0-N": what the server holds
        offset = int(persisted.rsplit("-", 1)[1]) + 1 if persisted else 0


# --- copying and deleting ----------------------------------------------------------------------------------------


def copy(src: str, dst: str) -> None:
    """A server-side copy: the bytes never pass through this machine (an SD UNet is 3.4 GB). A failed rewrite
    starts over; copying the same bytes again is harmless."""

    def attempt() -> None:
        source, target = blob(src), blob(dst)
        token = None
        while True:
            token, _, _ = target.rewrite(source, token=token, timeout=_timeout(), retry=None)
            if token is None:
                return

    with errors_named(src):
        with_retries(f"{src} -> {dst}", "copy", attempt)


def delete(uri: str) -> None:
    """Delete one object; one that is already gone (perhaps by an attempt whose answer was lost) is fine."""
    from google.api_core import exceptions as gexc

    def attempt() -> None:
        with contextlib.suppress(gexc.NotFound):
            blob(uri).delete(timeout=_timeout(), retry=None)

    with errors_named(uri):
        with_retries(uri, "delete", attempt)
