"""A PEP 503 package index on 127.0.0.1 serving local wheels (the host's torch CPU wheel), for image builds where
the PyTorch index is unreachable.

`docker build --network host --build-arg TORCH_INDEX_URL=http://127.0.0.1:PORT/simple` then installs
torch==2.13.0+cpu from this machine, hash-checked against the lock, instead of failing. pip treats 127.0.0.1 as
a secure origin, so plain HTTP is accepted.

    python scripts/containers/torch_index.py                # fetch torch==2.13.0 with pip's own config, serve it
    python scripts/containers/torch_index.py --wheels DIR   # serve the wheels already in DIR
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

TORCH_REQUIREMENT = "torch==2.13.0"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(requirement: str, dest: Path) -> list[Path]:
    """`pip download REQ --no-deps`: with this machine's pip configuration, which is where the CPU wheel lives
    (find-links); the image build itself never sees that configuration."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        requirement,
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return sorted(dest.glob("*.whl"))


def _wheel_metadata(wheel: Path) -> bytes:
    """The wheel's METADATA (PEP 658): pip then resolves without downloading a 190 MB wheel first."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return zf.read(name)


class WheelIndex:
    """The pages and files of an index over the wheels in one folder, computed once."""

    def __init__(self, wheel_dir: Path):
        self.files: dict[str, bytes | Path] = {}
        self.projects: dict[str, list[str]] = {}
        for wheel in sorted(Path(wheel_dir).glob("*.whl")):
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            metadata = _wheel_metadata(wheel)
            self.files[wheel.name] = wheel
            self.files[wheel.name + ".metadata"] = metadata
            link = (
                f'<a href="/files/{quote(wheel.name)}#sha256={digest}" '
                f'data-dist-info-metadata="sha256={hashlib.sha256(metadata).hexdigest()}" '
                f'data-core-metadata="sha256={hashlib.sha256(metadata).hexdigest()}">{html.escape(wheel.name)}</a>'
            )
            self.projects.setdefault(canonical(wheel.name.split("-", 1)[0]), []).append(link)
        if not self.projects:
            raise SystemExit(f"{wheel_dir}: no wheels to serve")

    def page(self, path: str) -> tuple[int, str, bytes | Path]:
        """(status, content type, body) for one request path."""
        path = unquote(path.split("?", 1)[0])
        if path.rstrip("/") == "/simple":
            links = "".join(f'<a href="/simple/{p}/">{p}</a><br>' for p in sorted(self.projects))
            return 200, "text/html", _html(links)
        m = re.fullmatch(r"/simple/([^/]+)/?", path)
        if m and canonical(m[1]) in self.projects:
            return 200, "text/html", _html("<br>".join(self.projects[canonical(m[1])]))
        m = re.fullmatch(r"/files/([^/]+)", path)
        if m and m[1] in self.files:
            return 200, "application/octet-stream", self.files[m[1]]
        return 404, "text/plain", b"not found\n"


def _html(body: str) -> bytes:
    return f"<!DOCTYPE html><html><body>{body}</body></html>\n".encode()


def _handler(index: WheelIndex) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            status, ctype, body = index.page(self.path)
            data = body.read_bytes() if isinstance(body, Path) else body
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # pip's requests are not news
            pass

    return Handler


@contextmanager
def serve(wheel_dir: Path, port: int = 0):
    """Serve `wheel_dir` on 127.0.0.1 for the block; yields the index URL (…/simple)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(WheelIndex(wheel_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_host_torch(requirement: str = TORCH_REQUIREMENT):
    """Fetch `requirement`'s wheel with this machine's pip configuration and serve it; yields the index URL."""
    with tempfile.TemporaryDirectory(prefix="torch-index-") as tmp:
        download_wheels(requirement, Path(tmp))
        with serve(Path(tmp)) as url:
            yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="serve the wheels in this folder (default: pip download)")
    parser.add_argument("--requirement", default=TORCH_REQUIREMENT)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="torch-index-") as tmp:
        wheels = args.wheels or Path(tmp)
        if args.wheels is None:
            download_wheels(args.requirement, wheels)
        with serve(wheels, args.port) as url:
            print(url, flush=True)
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
