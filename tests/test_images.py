"""What can be checked of the images without a Docker engine: Dockerfiles parse, pins are the tested ones and
resolve, and the tags are the ones the compiled YAML references."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
IMAGES = REPO / "images"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
    "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "a continuation line runs off the end of the file"
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_parses_and_installs_the_pins(name):
    instructions = parse_dockerfile((IMAGES / name).read_text())
    words = [w for w, _ in instructions]
    assert set(words) <= INSTRUCTIONS, f"unknown instruction(s): {set(words) - INSTRUCTIONS}"
    first = next(i for i, w in enumerate(words) if w != "ARG")  # only ARG may precede FROM
    assert words[first] == "FROM"
    copies = [a for w, a in instructions if w == "COPY"]
    assert "images/requirements.txt /opt/dreambooth/requirements.txt" in copies
    assert any(a.startswith("dreambooth_lib ") for a in copies), "the project is copied in"
    runs = [a for w, a in instructions if w == "RUN"]
    assert any("pip install" in r and "-r requirements.txt" in r for r in runs)
    assert any("pip install --no-deps ." in r for r in runs), (
        "the project installs on the pins, resolving nothing"
    )
    assert [w for w, _ in instructions if w == "USER"], "the container does not run as root"


def test_parser_rejects_what_docker_rejects():
    assert parse_dockerfile("# c\nARG X=1\nFROM a:${X}\nRUN a \\\n  && b\n") == [
        ("ARG", "X=1"),
        ("FROM", "a:${X}"),
        ("RUN", "a  && b"),
    ]
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM a\nRUN b \\\n")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (IMAGES / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.]*)", line)
        assert m, f"requirements.txt: {line!r} is not an exact pin 'name==version'"
        key = re.sub(r"[-_.]+", "-", m[1]).lower()
        assert key not in pins, f"{key} pinned twice"
        pins[key] = m[2]
    return pins


def test_pins_are_the_tested_versions_and_cover_pyproject():
    from packaging.requirements import Requirement

    pins = _pins()
    for key, version in pins.items():
        installed = md.version(key).split("+")[0]
        assert installed == version, f"{key}: pinned {version}, tests run with {installed}"
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"(?ms)^dependencies = \[(.*?)^\]", pyproject)[1]
    for raw in re.findall(r'"([^"]+)"', deps):
        req = Requirement(raw)
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in pins, f"pyproject dependency {req.name} is not pinned in images/requirements.txt"
        assert req.specifier.contains(pins[key], prereleases=True), f"{key}=={pins[key]} violates {raw}"


@pytest.mark.slow  # ~20 s of index look-ups
def test_pins_resolve_on_the_index(tmp_path):
    """Every pin exists on the package index (metadata only, no wheel downloads). Skipped when offline."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q"]
    cmd += ["--report", str(tmp_path / "report.json"), "-r", str(IMAGES / "requirements.txt")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("package index too slow to answer")
    if proc.returncode != 0 and re.search(r"(?i)connection|network|resolve host|offline", proc.stderr):
        pytest.skip("package index unreachable")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    resolved = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower() for i in report["install"]}
    assert resolved == set(_pins())


def test_tags_match_the_compiled_yaml(monkeypatch):
    from components import images

    monkeypatch.delenv("DREAMBOOTH_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("DREAMBOOTH_IMAGE_TAG", raising=False)
    from dreambooth_lib import __version__

    assert images.image_tag() == re.sub(r"[^A-Za-z0-9_.-]", "-", __version__)
    referenced = set()
    for path in (REPO / "pipelines" / "compiled").glob("*.yaml"):
        spec = next(iter(yaml.safe_load_all(path.read_text())))
        referenced |= {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert referenced == {images.cpu_image(), images.cuda_image()}
    out = subprocess.run(
        [sys.executable, "-m", "components.images"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [images.cpu_image(), images.cuda_image()], "what `make images` tags"


def test_image_names_follow_the_environment(monkeypatch):
    from components import images

    monkeypatch.setenv("DREAMBOOTH_IMAGE_REGISTRY", "us-docker.pkg.dev/p/r/")
    monkeypatch.setenv("DREAMBOOTH_IMAGE_TAG", "1.2.3+local")
    assert images.cpu_image() == "us-docker.pkg.dev/p/r/dreambooth-cpu:1.2.3-local"
    assert images.cuda_image() == "us-docker.pkg.dev/p/r/dreambooth-cuda:1.2.3-local"
