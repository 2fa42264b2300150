"""What can be checked of the images without a Docker engine: Dockerfiles parse, pins are the tested ones and
resolve, and the tags are the ones the compiled YAML references."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
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


def stages(name: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the ARGs before the first FROM are stage 0's)."""
    out: list[list[tuple[str, str]]] = [[]]
    for word, args in parse_dockerfile((IMAGES / name).read_text()):
        if word == "FROM" and any(w == "FROM" for w, _ in out[-1]):
            out.append([])
        out[-1].append((word, args))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_parses(name):
    words = [w for w, _ in parse_dockerfile((IMAGES / name).read_text())]
    assert set(words) <= INSTRUCTIONS, f"unknown instruction(s): {set(words) - INSTRUCTIONS}"
    first = next(i for i, w in enumerate(words) if w != "ARG")  # only ARG may precede FROM
    assert words[first] == "FROM"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_dockerfile_installs_exactly_the_lock_and_the_projects_wheel(kind):
    name = f"Dockerfile.{kind}"
    instructions = parse_dockerfile((IMAGES / name).read_text())
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in instructions[:1], "the base is a build arg"
    env_stage, wheel_stage, final = stages(name)
    assert ("COPY", f"images/{kind}.lock.txt /tmp/lock.txt") in env_stage
    install = next(a for w, a in env_stage if w == "RUN" and "-r /tmp/lock.txt" in a)
    assert "python3 -m venv /opt/venv" in install and "pip install --require-hashes" in install
    # the source tree only in the throwaway wheel stage; the image installs the wheel, resolving nothing
    assert any(w == "COPY" and a.startswith("dreambooth_lib ") for w, a in wheel_stage)
    assert any(w == "RUN" and "pip wheel --no-deps" in a for w, a in wheel_stage)
    assert not [a for w, a in final if w == "COPY" and not a.startswith("--from=")], "no source in the image"
    installs = [a for w, a in final if w == "RUN" and "pip install" in a]
    assert installs and all("--no-deps --no-index" in a and "rm -rf /tmp/wheels" in a for a in installs)
    assert [a for w, a in final if w == "WORKDIR"] == ["/var/cache/dreambooth"], "never the source folder"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_dockerfile_runs_as_any_uid(kind):
    name = f"Dockerfile.{kind}"
    instructions = parse_dockerfile((IMAGES / name).read_text())
    users = [a for w, a in instructions if w == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), "runAsNonRoot needs a numeric USER"
    env = " ".join(a for w, a in instructions if w == "ENV")
    cache_vars = ["HOME", "XDG_CACHE_HOME", "HF_HOME", "DREAMBOOTH_CACHE", "TORCHINDUCTOR_CACHE_DIR"]
    for var in cache_vars:
        assert re.search(rf"\b{var}=/var/cache/dreambooth\b", env), f"{var} is not in the shared cache folder"
    runs = " ".join(a for w, a in instructions if w == "RUN")
    assert "chmod 1777" in runs and all(f'"${var}"' in runs.split("chmod 1777", 1)[1] for var in cache_vars)
    assert all("NVIDIA_VISIBLE_DEVICES" not in a for _, a in instructions), (
        "GPU visibility is the device plugin's"
    )


def test_cpu_image_takes_its_torch_index_as_a_build_arg():
    instructions = parse_dockerfile((IMAGES / "Dockerfile.cpu").read_text())
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions
    install = next(a for w, a in instructions if w == "RUN" and "-r /tmp/lock.txt" in a)
    assert '--extra-index-url "$TORCH_INDEX_URL"' in install
    assert _lock("cpu")["torch"][0] == "2.13.0+cpu", "a +cpu pin cannot silently become PyPI's CUDA build"


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


LOCK_LINE = re.compile(r"([a-z0-9][a-z0-9-]*)==([0-9][0-9A-Za-z.+!]*)((?: --hash=sha256:[0-9a-f]{64})+)")
TOOLS = {"pip", "setuptools", "wheel"}


def _lock(kind: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256, ...])} of images/<kind>.lock.txt, checking every entry's form."""
    text = (IMAGES / f"{kind}.lock.txt").read_text()
    body = re.sub(r" *\\\n\s*", " ", "\n".join(x for x in text.splitlines() if not x.startswith("#")))
    out = {}
    for line in filter(None, (x.strip() for x in body.splitlines())):
        m = LOCK_LINE.fullmatch(line)
        assert m, f"{kind}.lock.txt: {line!r} is not 'name==version --hash=sha256:...'"
        assert m[1] not in out, f"{kind}.lock.txt: {m[1]} twice"
        out[m[1]] = (m[2], re.findall(r"[0-9a-f]{64}", m[3]))
    return out


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_lock_is_the_pins_plus_the_images_own_packages(kind):
    """Each image's lock holds every runtime pin at its version, and beyond them only the image's tools (and, for
    CUDA, torch's CUDA runtime): nothing is left to resolve at build time."""
    lock, pins = _lock(kind), _pins()
    for name, version in pins.items():
        expected = f"{version}+cpu" if (name, kind) == ("torch", "cpu") else version
        assert lock[name][0] == expected, (
            f"{kind}.lock.txt: {name} {lock[name][0]}, requirements.txt {version}"
        )
    extra = set(lock) - set(pins)
    assert TOOLS <= extra
    cuda_runtime = {n for n in extra if n.startswith(("nvidia-", "cuda-")) or n == "triton"}
    assert extra - TOOLS - cuda_runtime == set(), (
        f"{kind}.lock.txt: unexpected {extra - TOOLS - cuda_runtime}"
    )
    if kind == "cuda":
        assert {"triton", "cuda-bindings"} <= cuda_runtime and any(
            n.startswith("nvidia-cu") for n in cuda_runtime
        )
    else:
        assert not cuda_runtime, "the CPU image carries no CUDA runtime"


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore `patterns` leave `path` out of the build context (the last matching rule wins; a
    rule that matches a folder applies to everything below it)."""

    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        return re.compile(out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_dockerfiles_copy():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = set()
    for name in DOCKERFILES:
        for word, args in parse_dockerfile((IMAGES / name).read_text()):
            if word == "COPY" and not args.startswith("--from="):
                copied |= set(args.split()[:-1])
    for source in sorted(copied):
        assert (REPO / source).exists(), f"COPY {source}: not in the checkout"
        assert not _ignored(patterns, source), f".dockerignore leaves out {source}, which a Dockerfile copies"
    assert not _ignored(patterns, "dreambooth_lib/assets/bpe_simple_vocab_16e6.txt.gz")
    for junk in [
        ".venv/bin/python", ".git/HEAD", "build/lib/x.py", "dreambooth_kfp.egg-info/PKG-INFO", "demo-out/x",
        "dreambooth_lib/__pycache__/storage.cpython-311.pyc", "pipelines/compiled/personalize.kfp.yaml",
        "tests/test_images.py", ".pytest_cache/v", "dreambooth_lib/build/x",
    ]:  # fmt: skip
        assert _ignored(patterns, junk), f"{junk} would be sent as build context"


def _container_script(name: str):
    """scripts/containers/<name>.py imported as a module (the folder is not a package)."""
    sys.path.insert(0, str(REPO / "scripts" / "containers"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_torch_index_serves_a_wheel_pip_installs(tmp_path):
    """scripts/containers/torch_index.py: a PEP 503 page with hashes and PEP 658 metadata that pip accepts."""
    import zipfile

    torch_index = _container_script("torch_index")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tiny_pkg-1.0+cpu-py3-none-any.whl", "w") as zf:
        zf.writestr("tiny_pkg/__init__.py", "")
        zf.writestr(
            "tiny_pkg-1.0+cpu.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0+cpu\n"
        )
        zf.writestr(
            "tiny_pkg-1.0+cpu.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr("tiny_pkg-1.0+cpu.dist-info/RECORD", "")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    with torch_index.serve(wheels) as url:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--index-url", url,
             "-d", str(tmp_path / "got"), "tiny-pkg==1.0+cpu"],
            capture_output=True, text=True, env={**env, "PIP_CONFIG_FILE": os.devnull}, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert torch_index.WheelIndex(wheels).page("/simple/numpy/")[0] == 404
    assert [p.name for p in (tmp_path / "got").iterdir()] == ["tiny_pkg-1.0+cpu-py3-none-any.whl"]


def test_base_image_finds_the_debian_mirror_in_apt_sources(tmp_path):
    base_image = _container_script("base_image")
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert base_image.debian_mirror(apt) == "http://deb.debian.org/debian"  # none configured
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert base_image.debian_mirror(apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text("deb [arch=amd64] https://one-line.example/debian bookworm main\n")
    assert base_image.debian_mirror(apt) == "https://one-line.example/debian"


@pytest.mark.slow  # index look-ups
def test_pypi_has_no_cpu_torch_so_the_cpu_pin_cannot_fall_back(tmp_path):
    """The reason the CPU image pins `+cpu`: from PyPI alone `torch==2.13.0` resolves (to the CUDA build) while
    `torch==2.13.0+cpu` does not, so an unreachable PyTorch index fails the build."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull

    def resolves(requirement: str) -> bool:
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q"]
        cmd += ["--index-url", "https://pypi.org/simple", requirement]
        try:
            return subprocess.run(cmd, capture_output=True, env=env, timeout=120).returncode == 0
        except subprocess.TimeoutExpired:
            pytest.skip("package index too slow to answer")

    if not resolves("torch==2.13.0"):
        pytest.skip("PyPI unreachable")
    assert not resolves("torch==2.13.0+cpu")


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
