"""Fixtures of the container tests (`make test-containers`; deselected from `make test` by the `containers`
marker): the Docker engine, the images under test, and a summary of what was measured, printed at the end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The same per-process settings as the rest of the suite (tests/conftest.py), for the host side of each test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEASURES = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[MEASURES] = []


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(MEASURES, [])
    if lines:
        terminalreporter.section("container measurements")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def measure(pytestconfig):
    """measure(line): a line for the summary printed after the tests."""
    return pytestconfig.stash[MEASURES].append


@pytest.fixture(scope="session")
def docker_client():
    """The engine at DOCKER_HOST. These tests run only when asked for, so no engine is a failure, not a skip."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as err:  # noqa: BLE001 - any reason the engine does not answer is the same failure
        pytest.fail(
            f"no Docker engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(default socket)')}: {err}; "
            "run `make test-containers`, which starts one"
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(docker_client):
    """{'cpu': name, 'cuda': name, 'cuda_built': bool}: the names the pipelines' components reference."""
    import docker

    from components import images as names

    found = {}
    for kind, name in (("cpu", names.cpu_image()), ("cuda", names.cuda_image())):
        try:
            found[kind] = docker_client.images.get(name)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{name} is not built: run `make test-containers` (or scripts/containers/build.py)")
    return {
        "cpu": names.cpu_image(),
        "cuda": names.cuda_image(),
        "cuda_built": found["cuda"].id != found["cpu"].id,
    }


@pytest.fixture(scope="session")
def run_in(docker_client):
    """run_in(image, command, user=..., volumes=...): the output of `command` in a fresh container of `image`
    run as `user`, or a test failure that shows it."""

    def run(image: str, command: list[str], *, user: str, volumes: dict | None = None) -> str:
        container = docker_client.containers.run(
            image, command, user=user, volumes=volumes or {}, detach=True
        )
        try:
            code = container.wait()["StatusCode"]
            out = container.logs(stdout=True, stderr=True).decode()
        finally:
            container.remove(force=True)
        if code != 0:
            pytest.fail(f"{image} {command} as {user} exited {code}:\n{out[-3000:]}")
        return out

    return run
