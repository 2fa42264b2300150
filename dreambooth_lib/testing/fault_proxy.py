"""A fault-injecting HTTP proxy for tests: put it between the GCS client and fake-gcs-server and it answers some
requests with the failures GCS shows at volume, chosen by a seeded schedule.

Fault kinds (`FAULT_KINDS`):
    503, 429, 500       an error answer instead of forwarding (429 with Retry-After)
    reset_upload        half of the request's body is read, then the connection is reset (not forwarded)
    reset_download      forwarded; the answer's headers and half its body are sent, then the connection is reset
    stall               nothing is answered for `stall_s` (past the client's timeout), then the connection closes
    drop_response       forwarded, so the server commits the write; the answer is dropped and the connection reset
    corrupt_download    forwarded; one byte of a downloaded object's body is flipped (headers untouched)

    proxy = FaultProxy(upstream="http://127.0.0.1:4443", schedule=FaultSchedule(seed=0, rate=0.1))
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
    ...
    proxy.stats()   # {"requests": 812, "faults": {"503": 9, ...}}
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = (
    "503",
    "429",
    "500",
    "reset_upload",
    "reset_download",
    "stall",
    "drop_response",
    "corrupt_download",
)
HEAD_BYTES = 4096  # of a request's body a rule may match: a multipart upload names its object there
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class Request:
    """What a fault decision may look at."""

    method: str
    path: str  # with the query
    body_bytes: int
    head: str = (
        ""  # the start of the body (latin-1), e.g. a multipart upload's metadata with the object's name
    )

    @property
    def is_media_download(self) -> bool:
        return self.method == "GET" and "alt=media" in self.path

    @property
    def is_write(self) -> bool:
        return self.method in WRITE_METHODS


def applicable(kind: str, request: Request) -> bool:
    """Whether `kind` can happen to `request` (a reset upload needs a body, a dropped answer a write, ...)."""
    if kind == "reset_upload":
        return request.body_bytes > 0
    if kind == "reset_download":
        return request.method == "GET"
    if kind == "drop_response":
        return request.is_write
    if kind == "corrupt_download":
        return request.is_media_download
    return True


@dataclass
class FaultRule:
    """A fault forced on matching requests, before the random schedule: `kind` for requests whose
    "METHOD path\nhead of the body" matches `pattern` (re.search), the first `times` of them (all when None)."""

    kind: str
    pattern: str
    times: int | None = None
    used: int = 0

    def take(self, request: Request) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if not re.search(self.pattern, f"{request.method} {request.path}\n{request.head}"):
            return False
        if not applicable(self.kind, request):
            return False
        self.used += 1
        return True


@dataclass
class FaultSchedule:
    """A fraction `rate` of requests get a fault, of a kind drawn among `kinds` that can happen to the request;
    draws come from one generator seeded with `seed` (the same request order gives the same faults)."""

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    rules: list[FaultRule] = field(default_factory=list)

    def __post_init__(self):
        unknown = set(self.kinds) - set(FAULT_KINDS) | {r.kind for r in self.rules} - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self, request: Request) -> tuple[str | None, bool]:
        """(the fault for `request` or None, whether a rule forced it)."""
        with self._lock:
            for rule in self.rules:
                if rule.take(request):
                    return rule.kind, True
            if self._rng.random() >= self.rate:
                return None, False
            choices = [k for k in self.kinds if applicable(k, request)]
            return (self._rng.choice(choices) if choices else None), False


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of `upstream`, injecting the faults of its schedule."""

    def __init__(self, upstream: str, schedule: FaultSchedule | None = None, stall_s: float = 1.0):
        self.upstream = urlsplit(upstream).netloc
        self.schedule = schedule or FaultSchedule()
        self.stall_s = stall_s
        self._counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault) of every request
        self._lock = threading.Lock()
        self.closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.netloc = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.netloc}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()

    def use(self, schedule: FaultSchedule) -> None:
        """Switch to `schedule` and start counting afresh."""
        with self._lock:
            self.schedule = schedule
            self._counts.clear()
            self.log.clear()

    def record(self, event: str) -> None:
        with self._lock:
            self._counts[event] += 1

    def logged(self, request: Request, fault: str | None) -> None:
        with self._lock:
            self.log.append((request.method, request.path, fault))

    def stats(self) -> dict:
        """{"requests": how many arrived, "faults": {kind: how many were injected}}; a fault a rule forced is
        counted as "<kind> (rule)"."""
        with self._lock:
            faults = {k: v for k, v in self._counts.items() if k != "requests"}
            return {"requests": self._counts["requests"], "faults": dict(sorted(faults.items()))}

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    proxy: FaultProxy

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without NODELAY, Nagle and delayed ACKs add 40 ms to each
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        try:
            self._serve()
        except OSError:  # the client gave up first (its timeout, after a stall): nothing to answer
            self.close_connection = True

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        head = b"" if chunked else self.rfile.read(min(length, HEAD_BYTES))
        request = Request(self.command, self.path, length if not chunked else 1, head.decode("latin-1"))
        self.proxy.record("requests")
        fault, forced = self.proxy.schedule.pick(request)
        counted = f"{fault} (rule)" if forced else fault
        self.proxy.logged(request, fault)
        if fault == "reset_upload":  # mid-body: the client is still sending the rest
            self.rfile.read(max(length // 2 - len(head), 0))
            self.proxy.record(counted)
            return self._reset()
        body = head + self._read_body(length - len(head), chunked)
        if fault in ("503", "429", "500"):
            self.proxy.record(counted)
            return self._error(int(fault))
        if fault == "stall":
            self.proxy.record(counted)
            self.proxy.closing.wait(self.proxy.stall_s)
            self.close_connection = True
            return None
        status, reason, headers, answer = self._forward(body)
        if fault == "drop_response":
            self.proxy.record(counted)
            return self._reset()
        if fault == "corrupt_download" and answer and status in (200, 206):  # an object's bytes, not an error
            self.proxy.record(counted)
            middle = len(answer) // 2
            answer = answer[:middle] + bytes([answer[middle] ^ 0xFF]) + answer[middle + 1 :]
        if fault == "reset_download":
            self.proxy.record(counted)
            self._send_head(status, reason, headers, len(answer))
            self.wfile.write(answer[: len(answer) // 2])
            self.wfile.flush()
            return self._reset()
        self._send_head(status, reason, headers, len(answer))
        if self.command != "HEAD":
            self.wfile.write(answer)

    def _read_body(self, length: int, chunked: bool) -> bytes:
        if not chunked:
            return self.rfile.read(length) if length else b""
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        upstream = HTTPConnection(self.proxy.upstream, timeout=30)
        try:
            upstream.connect()
            upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
            out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            answer = self._json_here(out_headers, answer)
            return response.status, response.reason, self._pointing_here(out_headers), answer
        finally:
            upstream.close()

    def _pointing_here(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Session and media URLs the server hands out name the proxy, so their requests pass through it too."""
        return [
            (k, v.replace(self.proxy.upstream, self.proxy.netloc) if k.lower() == "location" else v)
            for k, v in headers
        ]

    def _json_here(self, headers: list[tuple[str, str]], answer: bytes) -> bytes:
        content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
        if "json" not in content_type:
            return answer
        return answer.replace(self.proxy.upstream.encode(), self.proxy.netloc.encode())

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in ("content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _error(self, status: int) -> None:
        reasons = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
        body = json.dumps(
            {"error": {"code": status, "message": f"{reasons[status]} (injected by the fault proxy)"}}
        )
        self.send_response_only(status, reasons[status])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body.encode())

    def _reset(self) -> None:
        """Close with an RST (SO_LINGER 0), as a dropped connection or a crashed peer does."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
