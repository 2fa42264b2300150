"""How GCS requests are retried: which failures are transient, the backoff between attempts, and their counts.

At the volume of a batch (tens of thousands of objects) 429s, 5xx, reset connections and slow responses are
routine; each request is retried with exponential backoff and full jitter, honouring a server's Retry-After,
until `RetryPolicy.max_attempts` or `deadline_s` runs out, and then fails with an error naming the URI. The
defaults follow google-cloud-storage's own (1 s doubling, 120 s in all, 60 s per request); tests install a policy
of milliseconds with `retry_policy_in_effect`.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from dreambooth_lib.errors import StorageError

T = TypeVar("T")

MiB = 1 << 20
# HTTP statuses GCS documents as retryable: request timeout, too many requests, and the server-side errors.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff, deadlines and transfer sizes of every GCS request this process makes."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 32.0  # also caps a server's Retry-After
    multiplier: float = 2.0
    deadline_s: float = 120.0  # for one operation, all its attempts together
    max_attempts: int = 12
    request_timeout_s: float = 60.0  # connect and read, per request: a stalled response is abandoned after it
    multipart_max_bytes: int = 8 * MiB  # larger objects are uploaded resumably, in chunks
    chunk_bytes: int = 16 * MiB  # of a resumable upload; a multiple of 256 KiB, as GCS requires
    download_range_bytes: int = 64 * MiB  # a download's ranges, each retried on its own
    list_page_size: int = 1000  # the JSON API's maximum

    def backoff(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1, 2, ...): full jitter over an exponential ceiling
        (so many clients that failed together do not return together), at least what the server asked for."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        wait = random.uniform(0, ceiling)
        if retry_after_s is not None:
            wait = max(wait, min(retry_after_s, self.max_backoff_s))
        return wait


_policy = RetryPolicy()
_policy_lock = threading.Lock()


def current_policy() -> RetryPolicy:
    return _policy


def set_retry_policy(policy: RetryPolicy) -> RetryPolicy:
    """Install `policy` for every GCS request of this process; returns the one it replaces."""
    global _policy
    with _policy_lock:
        previous, _policy = _policy, policy
    return previous


@contextlib.contextmanager
def retry_policy_in_effect(policy: RetryPolicy) -> Iterator[RetryPolicy]:
    previous = set_retry_policy(policy)
    try:
        yield policy
    finally:
        set_retry_policy(previous)


# --- what happened: counts a test (or a log line) can report ----------------------------------------------------

_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def count(event: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[event] += n


def retry_counts() -> dict[str, int]:
    """Events since the process started: "retry" (every retried request), "retry: <reason>", "checksum
    mismatch", "write recognised" (a conditional write whose answer was lost, found committed as ours)."""
    with _counts_lock:
        return dict(_counts)


# --- which failures are transient --------------------------------------------------------------------------------


class TransientError(Exception):
    """A failure worth another attempt that the libraries do not raise themselves (a checksum mismatch, an object
    replaced while it was read in ranges)."""


def transient_reason(err: BaseException) -> str | None:
    """A short name for a failure that another attempt may not meet ("503", "timeout", "connection"), or None
    when retrying cannot help (404, 403, 412, a bug)."""
    import requests
    import urllib3
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exceptions
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    if isinstance(err, TransientError):
        return str(err).split(":", 1)[0]
    if isinstance(err, auth_exceptions.TransportError):  # refreshing a token met a network failure
        cause = err.args[0] if err.args and isinstance(err.args[0], BaseException) else None
        return transient_reason(cause) if cause is not None else "token refresh"
    if isinstance(err, DataCorruption):
        return "checksum mismatch"
    if isinstance(err, gexc.GoogleAPICallError):
        return str(err.code) if err.code in RETRYABLE_STATUS else None
    if isinstance(err, InvalidResponse):
        status = getattr(err.response, "status_code", None)
        return str(status) if status in RETRYABLE_STATUS else None
    if isinstance(err, requests.exceptions.Timeout | socket.timeout | TimeoutError):
        return "timeout"
    if isinstance(err, requests.exceptions.ConnectionError) and "timed out" in str(err).lower():
        return "timeout"  # a read timeout inside a streamed body surfaces as a ConnectionError
    if isinstance(err, urllib3.exceptions.TimeoutError):
        return "timeout"
    if isinstance(
        err,
        urllib3.exceptions.HTTPError  # ProtocolError, IncompleteRead: a body cut short
        | requests.exceptions.ConnectionError
        | requests.exceptions.ChunkedEncodingError
        | http.client.HTTPException
        | ConnectionError,
    ):
        return "connection"
    return None


def retry_after_s(err: BaseException) -> float | None:
    """The Retry-After of the response behind `err`, in seconds (the header's delta-seconds form)."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def with_retries(uri: str, action: str, attempt: Callable[[], T]) -> T:
    """`attempt()` until it succeeds, a failure is not transient (raised as is), or the policy's attempts or
    deadline run out (StorageError naming `uri`, the action and the last failure)."""
    policy = current_policy()
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except Exception as err:
            reason = transient_reason(err)
            if reason is None:
                raise
            elapsed = time.monotonic() - started
            wait = policy.backoff(attempts, retry_after_s(err))
            if attempts >= policy.max_attempts or elapsed + wait > policy.deadline_s:
                raise StorageError(
                    f"{uri}: {action} failed {attempts} times in {elapsed:.1f} s, last with {reason} "
                    f"({type(err).__name__}: {err}); GCS kept failing, run the step again later"
                ) from err
            count("retry")
            count(f"retry: {reason}")
            time.sleep(wait)
