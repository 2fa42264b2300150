"""A Python base image made from Debian packages, for machines that reach no container registry.

    python scripts/containers/base_image.py      # prints the image name (builds it unless already there)

`debootstrap --variant=minbase` of Debian bookworm (CPython 3.11, as in python:3.11-slim-bookworm) from the Debian
mirror this machine's apt already uses, then made to behave like the python:3.11-slim image for the Dockerfiles:
pip may install (no EXTERNALLY-MANAGED), `python` exists, and the TLS authorities this machine trusts beyond
Debian's (/usr/local/share/ca-certificates, e.g. an egress proxy) are trusted inside. Because of that last step the
image is for local builds and tests only: never push it.

The tag is a digest of the recipe (RECIPE, the suite, the packages), the mirror and the added certificates, so a
rerun reuses the image.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates"]
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE = "dreambooth-local-base"
RECIPE = (
    1  # bump when build() changes what goes into the image: the tag then changes and the image is rebuilt
)
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


def apt_sources(root: Path = Path("/etc/apt")) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every `deb` source apt on this machine reads (one-line and deb822 formats)."""
    out = []
    for path in [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    out.append((words[1], [words[2]]))
    for path in sorted((root / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                out += [(uri, fields.get("suites", [])) for uri in fields.get("uris", [])]
    return out


def debian_mirror(root: Path = Path("/etc/apt")) -> str:
    """The mirror apt uses here for the main suite (not -security/-updates); Debian's CDN when there is none."""
    for uri, suites in apt_sources(root):
        if SUITE in suites and uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def local_certificates() -> list[Path]:
    return sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []


def image_name(mirror: str) -> str:
    h = hashlib.sha256(f"{RECIPE}\0{SUITE}\0{mirror}\0{','.join(PACKAGES)}\0".encode())
    for cert in local_certificates():
        h.update(cert.name.encode() + b"\0" + cert.read_bytes())
    return f"{IMAGE}:{SUITE}-{h.hexdigest()[:12]}"


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def build(name: str, mirror: str) -> None:
    if not shutil.which("debootstrap"):
        raise SystemExit("base_image.py: debootstrap is not installed (Debian: apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="dreambooth-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(
            f"base_image.py: debootstrap {SUITE} from {mirror} (about a minute and a half)", file=sys.stderr
        )
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        (rootfs / "usr/bin/python").symlink_to("python3")
        certs = local_certificates()
        if certs:
            dest = rootfs / LOCAL_CA_DIR.relative_to("/")
            dest.mkdir(parents=True, exist_ok=True)
            for cert in certs:
                shutil.copyfile(cert, dest / cert.name)
            subprocess.run(
                ["chroot", str(rootfs), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL
            )
        # What debootstrap leaves that an image does not need: downloaded packages and the package lists.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / leftover).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        subprocess.run(
            ["docker", "import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8", "-", name],
            stdin=tar.stdout,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tar.stdout.close()
        if tar.wait() != 0:
            raise SystemExit("base_image.py: tar of the root filesystem failed")


def ensure() -> tuple[str, float]:
    """The base image's name and the seconds spent building it (0 when it was already there)."""
    mirror = debian_mirror()
    name = image_name(mirror)
    if image_exists(name):
        return name, 0.0
    t0 = time.perf_counter()
    build(name, mirror)
    return name, time.perf_counter() - t0


if __name__ == "__main__":
    name, seconds = ensure()
    print(
        f"base_image.py: {name} ({'reused' if not seconds else f'built in {seconds:.0f} s'})", file=sys.stderr
    )
    print(name)
