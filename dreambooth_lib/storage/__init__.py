"""The one place that speaks gs:// and local paths: read, write (atomic), list, copy, with GCS preconditions.

Every step reads and writes through this package; nothing else opens gs:// itself. Local writes go to a temporary
file in the same folder and are renamed into place, so a reader never sees half a file. A GCS object appears
whole or not at all, and writes accept `if_generation_match` preconditions; generation 0 means "only if the
object does not exist yet". Every GCS request is retried on transient failures and every download checked
against the object's checksum (storage.gcs, storage.retry). The client honours STORAGE_EMULATOR_HOST (tests
point it at a local fake-gcs-server).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreambooth_lib.errors import PreconditionFailed, StorageError
from dreambooth_lib.storage import gcs
from dreambooth_lib.storage.gcs import GCS_PREFIX, split_gcs
from dreambooth_lib.storage.retry import RetryPolicy as RetryPolicy  # the policy and its counts, re-exported
from dreambooth_lib.storage.retry import current_policy as current_policy
from dreambooth_lib.storage.retry import retry_counts as retry_counts
from dreambooth_lib.storage.retry import retry_policy_in_effect as retry_policy_in_effect
from dreambooth_lib.storage.retry import set_retry_policy as set_retry_policy


def is_gcs(uri: str | Path) -> bool:
    return str(uri).startswith(GCS_PREFIX)


def join(uri: str | Path, *parts: str) -> str:
    """Join path parts with '/' for gs:// and the OS separator locally."""
    uri = str(uri)
    if is_gcs(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return str(Path(uri, *parts))


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def _client():
    """The google-cloud-storage client (honours STORAGE_EMULATOR_HOST)."""
    return gcs.client()


def reset_client() -> None:
    """Forget the cached client (tests switch emulators)."""
    gcs.client.cache_clear()


# --- reading ---------------------------------------------------------------------------------------------------


def exists(uri: str | Path) -> bool:
    uri = str(uri)
    if is_gcs(uri):
        bucket, name = split_gcs(uri)
        if not name:
            return gcs.bucket_exists(uri)
        if gcs.metadata(uri) is not None:
            return True
        return _any_object_under(uri, bucket, name.rstrip("/") + "/")  # a "folder"
    return Path(uri).exists()


def is_dir(uri: str | Path) -> bool:
    uri = str(uri)
    if is_gcs(uri):
        bucket, name = split_gcs(uri)
        return _any_object_under(uri, bucket, name.rstrip("/") + "/" if name else "")
    return Path(uri).is_dir()


def _any_object_under(uri: str, bucket: str, prefix: str) -> bool:
    """Whether any object's name starts with `prefix`; False in a bucket that does not exist (as for a local
    path whose parent is missing), while other errors (permissions) still raise StorageError."""
    from google.api_core import exceptions as gexc

    try:
        return bool(gcs.list_objects(uri, prefix, limit=1))
    except StorageError as err:
        if isinstance(err.__cause__, gexc.NotFound):
            return False
        raise


def read_bytes(uri: str | Path) -> bytes:
    uri = str(uri)
    if is_gcs(uri):
        return gcs.read_bytes(uri)[0]
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a folder, expected a file") from None


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | Path) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as err:
        raise StorageError(f"{uri}: not valid JSON ({err})") from None


def get_generation(uri: str) -> int | None:
    """The GCS generation of an object (None if absent). Locally: None (use `locked` for read-modify-write)."""
    if not is_gcs(uri):
        return None
    meta = gcs.metadata(uri)
    return None if meta is None else int(meta.generation)


def read_bytes_with_generation(uri: str) -> tuple[bytes | None, int]:
    """(content, generation) for a read-modify-write loop; (None, 0) when absent. Generation 0 = 'must not exist'."""
    if is_gcs(uri):
        from google.api_core import exceptions as gexc

        try:
            return gcs.read_bytes(uri)
        except StorageError as err:
            if isinstance(err.__cause__, gexc.NotFound):
                return None, 0
            raise
    p = Path(uri)
    if not p.exists():
        return None, 0
    return p.read_bytes(), p.stat().st_mtime_ns


def list_files(prefix: str | Path, recursive: bool = True) -> list[str]:
    """Files under a folder/prefix, as full URIs, sorted. A missing prefix lists nothing."""
    prefix = str(prefix)
    if is_gcs(prefix):
        _, name = split_gcs(prefix)
        p = name.rstrip("/") + "/" if name else ""
        objects = gcs.list_objects(prefix, p, delimiter=None if recursive else "/")
        return sorted(o.uri for o in objects if not o.name.endswith("/"))
    root = Path(prefix)
    if not root.is_dir():
        return []
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(str(p) for p in it if p.is_file() and not p.name.startswith(".tmp-"))


def list_objects(prefix: str) -> list[gcs.ObjectInfo]:
    """Every object under a gs:// folder/prefix, by name, with its size and stored checksums (nothing is
    downloaded): what identifies a gs:// model's content."""
    _, name = split_gcs(prefix)
    objects = gcs.list_objects(prefix, name.rstrip("/") + "/" if name else "")
    return sorted(objects, key=lambda o: o.name)


def relative(uri: str, prefix: str) -> str:
    """The part of `uri` below `prefix`, with '/' separators."""
    uri, prefix = str(uri), str(prefix)
    if is_gcs(uri):
        return uri[len(prefix.rstrip("/")) + 1 :]
    return Path(uri).relative_to(prefix).as_posix()


# --- writing ---------------------------------------------------------------------------------------------------


def _current_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere it can only be read by setting it, which
    briefly changes it for every thread, so that fallback is the exception."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(fd_or_path: int | str) -> None:
    """Give a mkstemp file (always 0600) the mode a plain open() would: 0666 minus the umask (0644 by default),
    so another uid (a container user, a shared registry on NFS) can read what this step wrote."""
    os.chmod(fd_or_path, 0o666 & ~_current_umask())


@contextlib.contextmanager
def _replaced_atomically(dst: Path) -> Iterator[str]:
    """A temporary file beside `dst` for the block to fill: renamed onto `dst` (readable by others) when the block
    ends, deleted when it raises, so a reader sees the old file or the whole new one, never half of it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
    os.close(fd)
    try:
        yield tmp
        _publish_mode(tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str | Path, data: bytes, *, if_generation_match: int | None = None) -> None:
    """Write atomically. On GCS, `if_generation_match` (0 = must not exist) raises PreconditionFailed on a race;
    a write whose answer was lost but which committed is recognised as ours (storage.gcs.upload)."""
    uri = str(uri)
    if is_gcs(uri):
        gcs.upload(uri, bytes(data), if_generation_match=if_generation_match)
        return
    path = Path(uri)
    if if_generation_match is not None:
        current = path.stat().st_mtime_ns if path.exists() else 0
        if current != if_generation_match:
            raise PreconditionFailed(f"{uri}: changed by another writer since it was read")
    with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(uri: str | Path, text: str, **kwargs) -> None:
    write_bytes(uri, text.encode("utf-8"), **kwargs)


def write_json(uri: str | Path, obj: Any, **kwargs) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", **kwargs)


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy one local file to `uri` (local or gs://), atomically."""
    uri = str(uri)
    if is_gcs(uri):
        gcs.upload(uri, str(local_path))
        return
    with _replaced_atomically(Path(uri)) as tmp:
        shutil.copyfile(local_path, tmp)


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy one object/file to a local path, atomically."""
    uri = str(uri)
    with _replaced_atomically(Path(local_path)) as tmp:
        if is_gcs(uri):
            sink, _ = gcs.download(uri, lambda: open(tmp, "wb"))  # noqa: SIM115 - closed below
            sink.close()
        else:
            try:
                shutil.copyfile(uri, tmp)
            except FileNotFoundError:
                raise StorageError(f"{uri}: file not found") from None


def copy(src: str, dst: str) -> None:
    """Copy one file between any two URIs."""
    if not is_gcs(src):
        upload_file(src, dst)
    elif not is_gcs(dst):
        download_file(src, dst)
    else:
        gcs.copy(src, dst)


def copy_prefix(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every file under `src` to the same relative path under `dst`; returns the written URIs."""
    src, dst = str(src), str(dst)
    files = list_files(src)
    if not files:
        raise StorageError(f"{src}: nothing to copy (empty or missing folder)")
    written = []
    for f in files:
        target = join(dst, *relative(f, src).split("/"))
        copy(f, target)
        written.append(target)
    return written


def delete(uri: str | Path) -> None:
    uri = str(uri)
    if is_gcs(uri):
        gcs.delete(uri)
        return
    with contextlib.suppress(FileNotFoundError):
        Path(uri).unlink()


def delete_prefix(uri: str | Path) -> None:
    uri = str(uri)
    if is_gcs(uri):
        for f in list_files(uri):
            delete(f)
        return
    shutil.rmtree(uri, ignore_errors=True)


def rename_prefix(src: str, dst: str) -> None:
    """Move a folder into place: one rename locally (atomic), copy-then-delete on GCS."""
    if is_gcs(src) != is_gcs(dst):
        raise StorageError(f"cannot rename across storage kinds: {src} -> {dst}")
    if is_gcs(src):
        copy_prefix(src, dst)
        delete_prefix(src)
        return
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


# --- local staging ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(uri: str | Path) -> Iterator[None]:
    """An exclusive lock for a read-modify-write of a local file (a no-op on GCS: use generations there)."""
    uri = str(uri)
    if is_gcs(uri):
        yield
        return
    lock = Path(uri + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def local_dir_for_reading(uri: str | Path, cache_root: str | Path | None = None) -> Iterator[Path]:
    """A local folder with the content of `uri`: the folder itself when local, a temporary download for gs://."""
    uri = str(uri)
    if not is_gcs(uri):
        if not Path(uri).exists():
            raise StorageError(f"{uri}: folder not found")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="dreambooth-", dir=cache_root) as tmp:
        copy_prefix(uri, tmp)
        yield Path(tmp)


@contextlib.contextmanager
def local_dir_for_writing(uri: str | Path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local staging folder whose files are published to `uri` when the block succeeds (nothing otherwise).
    The files named in `last` (relative paths: a marker whose presence says the rest is complete) are uploaded
    after every other file."""
    uri = str(uri)
    if not is_gcs(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="dreambooth-out-") as tmp:
        yield Path(tmp)
        files = list_files(tmp)
        markers = [f for f in files if relative(f, tmp) in last]
        for f in [f for f in files if f not in markers] + markers:
            copy(f, join(uri, *relative(f, tmp).split("/")))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a local file or a gs:// object, streamed (never the whole file in memory)."""
    return file_hash(path, "sha256").hexdigest()


def file_hash(path: str | Path, algorithm: str):
    """The hashlib hash (`algorithm`: "sha256", "md5", ...) of a local file, read in 1 MiB chunks, or of a gs://
    object, downloaded range by range and verified against its stored checksum."""
    path = str(path)
    if is_gcs(path):
        sink, _ = gcs.download(path, lambda: _HashSink(algorithm))
        return sink.hash
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


class _HashSink:
    """A download sink that keeps only the hash of what it is given."""

    def __init__(self, algorithm: str):
        self.hash = hashlib.new(algorithm, usedforsecurity=False)

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


def digest_prefix(uri: str | Path) -> str:
    """A content digest of every file under a folder/prefix (relative names + sha256 of bytes)."""
    uri = str(uri)
    h = hashlib.sha256()
    for f in list_files(uri):
        rel = relative(f, uri)
        if rel.endswith(".lock"):
            continue
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
