"""Write images/<image>.lock.txt: the complete environment of one image, every package pinned with its sha256.

The lock is resolved, not frozen: `pip install --dry-run --ignore-installed --report` from the package index,
run by a Python of the images' platform (CPython 3.11, Linux x86_64, glibc <= bookworm's 2.36), so the CUDA
image's lock needs no GPU, no Docker and no 3 GB download (pip reads the wheels' metadata only; the hashes come
from the index). `--platform` is not used because it forbids sdists, and a few pins (kfp-server-api) are sdists.
Inputs: images/requirements.txt (the runtime pins, shared with the development venv), torch's variant for the
image, and the image's tools (pip, setuptools, wheel: the newest on the index when the lock is made; setuptools
and wheel build the project's own wheel inside the image, pip installs the lock).

    python scripts/containers/lock.py cuda                  # PyPI: torch 2.13.0 with its nvidia-*/triton wheels
    python scripts/containers/lock.py cpu                   # torch 2.13.0+cpu from the PyTorch CPU index
    python scripts/containers/lock.py cpu --torch-index host  # this machine's torch wheel (torch_index.py)

The host's pip configuration (find-links, extra indexes, constraints) is ignored: the lock names only what an
image build can fetch from the indexes given here. `tests/containers` checks that a built image's
`pip freeze --all` is exactly its lock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
PYPI = "https://pypi.org/simple"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH = {"cpu": "torch==2.13.0+cpu", "cuda": "torch==2.13.0"}
TOOLS = ["pip", "setuptools", "wheel"]
PYTHON_VERSION = (3, 11)
BOOKWORM_GLIBC = (2, 36)  # Debian bookworm, the base of both images


def check_host() -> None:
    """The resolution runs with this interpreter's tags and markers: they must be the image's (CPython 3.11 on
    Linux x86_64), and the glibc no newer than bookworm's, or a chosen wheel might not install there."""
    import platform

    libc, version = platform.libc_ver()
    if (
        sys.implementation.name != "cpython"
        or sys.version_info[:2] != PYTHON_VERSION
        or platform.machine() != "x86_64"
        or libc != "glibc"
        or tuple(int(x) for x in version.split(".")[:2]) > BOOKWORM_GLIBC
    ):
        raise SystemExit(
            f"lock.py resolves for the images' platform (CPython 3.11, Linux x86_64, glibc <= 2.36); this is "
            f"{sys.implementation.name} {platform.python_version()} {platform.machine()} {libc} {version}: "
            "run it with such a Python (e.g. inside python:3.11-slim-bookworm)"
        )


def lock_inputs(image: str) -> list[str]:
    """images/requirements.txt with torch replaced by the image's variant, plus the image's tools."""
    lines = []
    for raw in (IMAGES / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(TORCH[image] if re.match(r"torch==", line) else line)
    return lines + TOOLS


def _pip_env() -> dict[str, str]:
    """The environment without this machine's pip configuration (keeping its CA bundle and timeout)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def resolve(image: str, torch_index: str | None) -> list[dict]:
    """pip's installation report for the image's inputs on the image's platform."""
    with tempfile.TemporaryDirectory(prefix="lock-") as tmp:
        inputs = Path(tmp) / "inputs.txt"
        inputs.write_text("\n".join(lock_inputs(image)) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--prefer-binary", "--index-url", PYPI]
        if image == "cpu":
            cmd += ["--extra-index-url", torch_index or PYTORCH_CPU_INDEX]
        cmd += ["--report", str(Path(tmp) / "report.json"), "-r", str(inputs)]
        subprocess.run(cmd, check=True, env=_pip_env())
        return json.loads((Path(tmp) / "report.json").read_text())["install"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render(image: str, report: list[dict], command: str) -> str:
    header = [
        f"# The complete environment of the {image} image (the venv /opt/venv), written by",
        f"#   {command}",
        "# Do not edit by hand: change images/requirements.txt (or pyproject.toml) and regenerate.",
        "# Installed with `pip install --require-hashes -r` (a missing or changed file fails the build).",
    ]
    lines = []
    for item in sorted(report, key=lambda i: canonical(i["metadata"]["name"])):
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(
                f"{name}=={version}: the index gave no sha256 for {item['download_info']['url']}"
            )
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{hashes['sha256']}")
    return "\n".join(header) + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write images/<image>.lock.txt (see the module docstring).")
    parser.add_argument("image", choices=sorted(TORCH))
    parser.add_argument(
        "--torch-index",
        help=f"where torch+cpu comes from: a PEP 503 URL, or 'host' for this machine's wheel served by "
        f"torch_index.py (default {PYTORCH_CPU_INDEX}); the lock keeps that wheel's sha256",
    )
    parser.add_argument("--out", type=Path, help="default images/<image>.lock.txt")
    args = parser.parse_args(argv)
    out = args.out or IMAGES / f"{args.image}.lock.txt"
    check_host()
    command = " ".join(["python scripts/containers/lock.py", *(argv if argv is not None else sys.argv[1:])])
    if args.image == "cpu" and args.torch_index == "host":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch_index

        with torch_index.serve_host_torch() as url:
            report = resolve(args.image, url)
    else:
        report = resolve(args.image, args.torch_index)
    text = render(args.image, report, command)
    out.write_text(text)
    print(f"{out}: {text.count('--hash=')} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
