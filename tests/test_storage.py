"""One URI API for local paths and gs:// (against a real local fake-gcs-server)."""

import os
import threading

import pytest

from dreambooth_lib import storage
from dreambooth_lib.errors import PreconditionFailed, StorageError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket") + "/root"


def test_round_trip_bytes_text_json(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "t.txt"), "héllo")
    storage.write_json(storage.join(root, "j.json"), {"x": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo"
    assert storage.read_json(storage.join(root, "j.json")) == {"x": [1, 2]}
    assert storage.exists(storage.join(root, "a"))  # a folder/prefix exists when it holds files
    assert not storage.exists(storage.join(root, "missing"))


def test_list_is_sorted_full_uris_recursive(root):
    for name in ["b/2.txt", "a.txt", "b/1.txt"]:
        storage.write_text(storage.join(root, *name.split("/")), name)
    files = storage.list_files(root)
    assert [storage.relative(f, root) for f in files] == ["a.txt", "b/1.txt", "b/2.txt"]
    assert storage.list_files(storage.join(root, "nothing")) == []


def test_copy_prefix_between_kinds(root, tmp_path, gcs_bucket):
    for name in ["x/1.txt", "2.txt"]:
        storage.write_text(storage.join(root, *name.split("/")), name)
    for dst in [str(tmp_path / "copy"), gcs_bucket + "/copy"]:
        storage.copy_prefix(root, dst)
        assert storage.read_text(storage.join(dst, "x", "1.txt")) == "x/1.txt"
        assert storage.digest_prefix(dst) == storage.digest_prefix(root)


def test_missing_file_is_a_clear_error(root):
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(storage.join(root, "nope.txt"))


def test_a_missing_bucket_holds_nothing(gcs_emulator):
    """As a local path under a missing folder: nothing exists there (no raw client exception escapes)."""
    missing = "gs://no-such-bucket-here/models/base"
    assert not storage.exists(missing) and not storage.is_dir(missing)
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(missing + "/model_index.json")


def test_gcs_generation_precondition(gcs_bucket):
    uri = gcs_bucket + "/index.json"
    storage.write_text(uri, "v1", if_generation_match=0)  # create only if absent
    with pytest.raises(PreconditionFailed):
        storage.write_text(uri, "again", if_generation_match=0)
    data, gen = storage.read_bytes_with_generation(uri)
    assert data == b"v1"
    storage.write_text(uri, "v2", if_generation_match=gen)
    with pytest.raises(PreconditionFailed):  # a stale generation loses the race
        storage.write_text(uri, "v3", if_generation_match=gen)
    assert storage.read_text(uri) == "v2"


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"old")

    class Boom(Exception):
        pass

    real_fsync = os.fsync

    def failing_fsync(fd):
        raise Boom()

    os.fsync = failing_fsync
    try:
        with pytest.raises(Boom):
            storage.write_bytes(uri, b"new")
    finally:
        os.fsync = real_fsync
    assert storage.read_bytes(uri) == b"old"  # the old content is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_local_lock_serializes_read_modify_write(tmp_path):
    uri = str(tmp_path / "counter.txt")
    storage.write_text(uri, "0")

    def bump():
        for _ in range(20):
            with storage.locked(uri):
                storage.write_text(uri, str(int(storage.read_text(uri)) + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read_text(uri) == "80"


def test_gcs_uri_parsing():
    assert storage.split_gcs("gs://b/x/y") == ("b", "x/y")
    assert storage.join("gs://b/x/", "y", "z.png") == "gs://b/x/y/z.png"
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_gcs("gs:///x")


def test_which_gcs_failures_are_retried_and_how_long_it_waits():
    import requests
    from google.api_core import exceptions as gexc

    from dreambooth_lib.storage.retry import transient_reason

    assert transient_reason(gexc.ServiceUnavailable("x")) == "503"
    assert transient_reason(gexc.TooManyRequests("x")) == "429"
    assert transient_reason(requests.exceptions.ReadTimeout("x")) == "timeout"
    assert transient_reason(ConnectionResetError()) == "connection"
    for final in (gexc.NotFound("x"), gexc.Forbidden("x"), gexc.PreconditionFailed("x"), ValueError("bug")):
        assert transient_reason(final) is None  # another attempt cannot help: raised at once

    policy = storage.RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0)
    assert all(0 <= policy.backoff(1) <= 1.0 for _ in range(50))  # full jitter under the exponential ceiling
    assert all(0 <= policy.backoff(10) <= 8.0 for _ in range(50))
    assert all(policy.backoff(1, retry_after_s=3.0) >= 3.0 for _ in range(50))  # what the server asked for
    assert policy.backoff(1, retry_after_s=600.0) == 8.0  # but never past the policy's longest wait
