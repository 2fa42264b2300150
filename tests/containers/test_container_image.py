"""The built images as a cluster runs them: exactly their lock, any uid, nothing of the build left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parents[2]
ANY_UID = (
    "4242:4242"  # neither root nor the image's own 1000: what Kubernetes' runAsUser or OpenShift may pick
)
PROJECT = "dreambooth-kfp"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(kind: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "images" / f"{kind}.lock.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[canonical(m[1])] = m[2]
    return pins


def freeze_pins(text: str) -> dict[str, str]:
    """`pip freeze --all` as {name: version}; the project, installed from its wheel file, as 'name @ file://…'."""
    pins = {}
    for line in text.splitlines():
        if " @ " in line:
            name, _, url = line.partition(" @ ")
            version = re.search(r"-([^-]+)-py3-none-any\.whl", url)
            pins[canonical(name)] = version[1] if version else url
        elif "==" in line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def _image(images, kind):
    if kind == "cuda" and not images["cuda_built"]:
        pytest.skip("no CUDA image was built here (the CPU image stands in under its name)")
    return images[kind]


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_pip_freeze_is_exactly_the_lock(images, run_in, kind):
    from dreambooth_lib import __version__

    frozen = freeze_pins(run_in(_image(images, kind), ["pip", "freeze", "--all"], user=ANY_UID))
    assert frozen.pop(PROJECT) == __version__
    locked = lock_pins(kind)
    assert frozen == locked, {
        "in the image, not the lock": sorted(set(frozen.items()) - set(locked.items())),
        "in the lock, not the image": sorted(set(locked.items()) - set(frozen.items())),
    }


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_image_config_is_what_a_cluster_needs(docker_client, images, kind):
    config = docker_client.images.get(_image(images, kind)).attrs["Config"]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", config["User"]), (
        "runAsNonRoot needs a numeric, non-root USER"
    )
    env = dict(e.split("=", 1) for e in config["Env"])
    assert "NVIDIA_VISIBLE_DEVICES" not in env, "GPU visibility is the device plugin's"
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "DREAMBOOTH_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith("/var/cache/dreambooth"), name


PROBE = r"""
import getpass, json, os, sys, tempfile
import dreambooth_lib, torch
from dreambooth_lib.models import default_cache_dir
written = {}
for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "DREAMBOOTH_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
    folder = os.path.join(os.environ[name], "probe-%d" % os.getuid())
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "x"), "w") as f:
        f.write("ok")
    written[name] = folder
cache = default_cache_dir()
cache.mkdir(parents=True, exist_ok=True)
print(json.dumps({
    "uid": os.getuid(), "user": getpass.getuser(), "cwd": os.getcwd(), "written": written,
    "cache": str(cache), "package": dreambooth_lib.__file__, "torch": torch.__version__,
    "path": [p for p in sys.path if p],
}))
"""


def test_any_uid_gets_a_writable_home_and_caches(images, run_in):
    out = run_in(images["cpu"], ["python", "-c", PROBE], user=ANY_UID)
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["uid"] == 4242 and probe["user"]
    assert probe["cache"].startswith("/var/cache/dreambooth/")
    assert probe["torch"].endswith("+cpu")
    # the installed package, not a source copy: nothing on sys.path but the interpreter and the venv
    assert probe["package"] == "/opt/venv/lib/python3.11/site-packages/dreambooth_lib/__init__.py"
    assert all(p.startswith(("/usr/lib/python3", "/opt/venv/")) for p in probe["path"]), probe["path"]


def test_no_build_leftovers(images, run_in):
    """No source tree, build/ or egg-info of the project anywhere in the image; the CLI runs."""
    find = (
        "find / -xdev \\( -name 'dreambooth_kfp*.egg-info' -o -name 'dreambooth_lib' -o -name build "
        "-o -name 'pyproject.toml' \\) -not -path '/proc/*' -print 2>/dev/null; dreambooth --help >/dev/null"
    )
    found = run_in(images["cpu"], ["sh", "-c", find], user=ANY_UID).split()
    site = "/opt/venv/lib/python3.11/site-packages/"
    ours = [p for p in found if not p.startswith(site) or p == site + "dreambooth_lib/build"]
    # Debian's own pip in the base carries a package named `build`; nothing else may appear
    assert [p for p in ours if "/dist-packages/pip/" not in p] == [], ours
    assert site + "dreambooth_lib" in found


def test_files_written_in_a_container_are_readable_by_another_uid(images, run_in, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    volumes = {str(shared): {"bind": "/shared", "mode": "rw"}}
    write = (
        "from dreambooth_lib import storage; storage.write_json('/shared/out/metrics.json', {'dino': 0.5}); "
        "storage.upload_file('/etc/hostname', '/shared/out/copied')"
    )
    run_in(images["cpu"], ["python", "-c", write], user=ANY_UID, volumes=volumes)
    read = run_in(
        images["cpu"],
        ["sh", "-c", "cat /shared/out/metrics.json /shared/out/copied"],
        user="5151:5151",
        volumes=volumes,
    )
    assert '"dino": 0.5' in read
    assert (shared / "out" / "metrics.json").stat().st_uid == 4242
