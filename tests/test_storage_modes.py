"""Files written through `storage` get the mode a plain open() would give them (0666 minus the umask), not
mkstemp's private 0600: a container running as another uid, or a registry shared over NFS, must read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dreambooth_lib import storage


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_every_way(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    storage.write_bytes(tmp_path / "out" / "a.bin", b"x")
    storage.write_json(tmp_path / "out" / "metrics.json", {"dino": 0.5})
    storage.upload_file(src, str(tmp_path / "out" / "uploaded.bin"))
    storage.download_file(str(src), tmp_path / "out" / "downloaded.bin")
    storage.copy_prefix(tmp_path / "out", tmp_path / "copied")
    return sorted((tmp_path / "out").iterdir()) + sorted((tmp_path / "copied").iterdir())


def test_default_umask_gives_world_readable_files(tmp_path, umask):
    umask(0o022)
    written = _write_every_way(tmp_path)
    assert len(written) == 8
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(0o644) for p in written}


def test_files_follow_a_stricter_umask(tmp_path, umask):
    umask(0o077)  # a user who asked for private files keeps them private
    assert {oct(_mode(p)) for p in _write_every_way(tmp_path)} == {oct(0o600)}


def test_group_writable_umask_is_honoured(tmp_path, umask):
    umask(0o002)  # shared-group set-ups (OpenShift's arbitrary uid in group 0)
    assert {oct(_mode(p)) for p in _write_every_way(tmp_path)} == {oct(0o664)}


def test_no_temporary_files_remain(tmp_path, umask):
    umask(0o022)
    _write_every_way(tmp_path)
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []


# --- the model cache, for a uid the image never heard of ----------------------------------------------------------


@pytest.fixture
def cache_env(monkeypatch):
    for name in ("DREAMBOOTH_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cache_dir_prefers_dreambooth_cache_then_xdg_then_home(tmp_path, cache_env):
    from dreambooth_lib.models import default_cache_dir

    cache_env.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dreambooth"
    cache_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dreambooth"
    cache_env.setenv("DREAMBOOTH_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("home", [None, "/", "read-only"])
def test_cache_dir_falls_back_to_a_writable_temp_dir(tmp_path, cache_env, home):
    """HOME unset, '/', or not writable (an arbitrary uid in a container): a per-uid temp folder."""
    import tempfile

    from dreambooth_lib.models import default_cache_dir

    if home == "read-only":
        locked = tmp_path / "home"
        locked.mkdir()
        locked.chmod(0o555)
        if os.access(locked, os.W_OK):  # root ignores modes
            pytest.skip("running as root: no folder is read-only")
        home = str(locked)
    if home is not None:
        cache_env.setenv("HOME", home)
    cache = default_cache_dir()
    assert cache == Path(tempfile.gettempdir()) / f"dreambooth-cache-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    assert os.access(cache, os.W_OK)
