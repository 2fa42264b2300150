"""Build the images for the container tests, here or anywhere, reusing what is already built.

    python scripts/containers/build.py [--cuda] [--summary FILE]

- base: $PYTHON_IMAGE if set; else python:3.11-slim-bookworm when present or pullable; else one made from Debian
  packages (base_image.py), for machines that reach no registry;
- CPU image: torch==2.13.0+cpu from $TORCH_INDEX_URL if set, else this machine's own torch wheel served as a
  package index on 127.0.0.1 (torch_index.py; the build uses the host network to reach it);
- CUDA image: built only with --cuda (or DREAMBOOTH_BUILD_CUDA=1): ~3 GB of nvidia-* wheels. Otherwise the CPU
  image is also tagged under the CUDA image's name, so the pipelines' GPU steps run on the CPU image; this
  script says so.

Each image is also tagged `dreambooth-<kind>-build:<digest>`, the digest of everything the build reads (the
Dockerfile, .dockerignore, the lock, the project files, the base image's id): a rerun with nothing changed
reuses the image in a second. Prints one line per image (seconds, size); --summary writes them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import base_image  # noqa: E402
import torch_index  # noqa: E402

PYTHON_IMAGE = "python:3.11-slim-bookworm"
TORCH_INDEX_PORT = int(
    os.environ.get("DREAMBOOTH_TORCH_INDEX_PORT", "38111")
)  # fixed: the build cache keys on it
CONTEXT = ["pyproject.toml", "README.md", "dreambooth_lib", ".dockerignore"]


def docker(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def image_id(name: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()


def image_size(name: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())


def choose_base() -> tuple[str, float]:
    """(base image, seconds spent making it)."""
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"], 0.0
    if image_exists(PYTHON_IMAGE):
        return PYTHON_IMAGE, 0.0
    with contextlib.suppress(subprocess.TimeoutExpired):
        if docker("pull", PYTHON_IMAGE, check=False, timeout=120).returncode == 0:
            return PYTHON_IMAGE, 0.0
    print(
        f"build.py: no registry serves {PYTHON_IMAGE}: making a base image from Debian packages", flush=True
    )
    return base_image.ensure()


def build_digest(kind: str, base: str) -> str:
    h = hashlib.sha256(image_id(base).encode())
    files = [REPO / "images" / f"Dockerfile.{kind}", REPO / "images" / f"{kind}.lock.txt"]
    for entry in CONTEXT:
        path = REPO / entry
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if "__pycache__" in f.parts or f.suffix in (".pyc", ".pyo"):
            continue
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def torch_index_url():
    """$TORCH_INDEX_URL, or this machine's torch wheel served on 127.0.0.1."""
    if os.environ.get("TORCH_INDEX_URL"):
        yield os.environ["TORCH_INDEX_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="torch-index-") as tmp:
        torch_index.download_wheels(torch_index.TORCH_REQUIREMENT, Path(tmp))
        port = TORCH_INDEX_PORT if _port_free(TORCH_INDEX_PORT) else 0
        with torch_index.serve(Path(tmp), port) as url:
            print(f"build.py: serving this machine's torch wheel at {url}", flush=True)
            yield url


def build(kind: str, name: str, base: str, log_dir: Path, build_args: dict[str, str]) -> dict:
    """Build (or reuse) one image and tag it `name`; returns its line of the summary."""
    digest_tag = f"dreambooth-{kind}-build:{build_digest(kind, base)}"
    t0 = time.perf_counter()
    reused = image_exists(digest_tag)
    if not reused:
        log = log_dir / f"build-{kind}.log"
        cmd = ["docker", "build", "--network", "host", "-f", f"images/Dockerfile.{kind}", "-t", digest_tag]
        for key, value in {"PYTHON_IMAGE": base, **build_args}.items():
            cmd += ["--build-arg", f"{key}={value}"]
        print(f"build.py: building {kind} image (log {log})", flush=True)
        # The classic builder: Debian's engine and any client agree on it, and it honours --network host.
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        with open(log, "w") as out:
            proc = subprocess.run([*cmd, "."], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(f"build.py: the {kind} build failed; the end of {log}:", file=sys.stderr)
            print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
            raise SystemExit(1)
    docker("tag", digest_tag, name)
    return {
        "kind": kind,
        "image": name,
        "digest_tag": digest_tag,
        "reused": reused,
        "build_s": round(time.perf_counter() - t0, 1),
        "size_bytes": image_size(name),
        "base": base,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or reuse) the images; see the module docstring.")
    parser.add_argument("--cuda", action="store_true", default=os.environ.get("DREAMBOOTH_BUILD_CUDA") == "1")
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "dreambooth-containers")
    args = parser.parse_args(argv)
    from components import images

    args.logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, base_s = choose_base()
    summary = {"base": base, "base_build_s": round(base_s, 1), "images": []}
    with torch_index_url() as url:
        summary["images"].append(build("cpu", images.cpu_image(), base, args.logs, {"TORCH_INDEX_URL": url}))
    if args.cuda:
        summary["images"].append(build("cuda", images.cuda_image(), base, args.logs, {}))
    else:
        docker("tag", images.cpu_image(), images.cuda_image())
        print(
            f"build.py: NO CUDA IMAGE BUILT: {images.cuda_image()} is the CPU image under the CUDA name, so the GPU "
            "steps run on CPU torch (build the real one with --cuda or DREAMBOOTH_BUILD_CUDA=1)",
            flush=True,
        )
    summary["cuda_built"] = args.cuda
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    if base_s:
        print(f"build.py: base image {base} built in {base_s:.0f} s", flush=True)
    for line in summary["images"]:
        how = "reused" if line["reused"] else "built"
        print(
            f"build.py: {line['image']} {how} in {line['build_s']:.0f} s, {line['size_bytes'] / 1e9:.2f} GB "
            f"({line['digest_tag']})",
            flush=True,
        )
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
