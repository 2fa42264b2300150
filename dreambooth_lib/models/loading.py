"""Model loading: local folder, gs:// prefix or hub id, safetensors only unless asked; content digests.

A model URI is one of:
- a local diffusers folder (holds `model_index.json`), or a single model folder (`config.json`, e.g. CLIP, DINO);
- a `gs://` prefix holding such a folder, downloaded once into a cache folder keyed by the objects' content;
- a hub id (`org/name`), fetched with huggingface_hub into its own cache (no hub is reachable from CI);
- a LoRA artifact of ours: a folder with `pytorch_lora_weights.safetensors` and `dreambooth_lora.json`, whose
  `base_model` names the model the adapter applies to.

Pickle weights (.bin/.ckpt/.pt/.pth) can run arbitrary code when loaded: they are refused unless `allow_pickle`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from dreambooth_lib import storage
from dreambooth_lib.artifacts import LORA_MARKER_NAME, LORA_WEIGHTS_NAME
from dreambooth_lib.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _writable(path: Path) -> bool:
    """Whether this process can create `path` (its nearest existing ancestor is a writable folder)."""
    for p in (path, *path.parents):
        if p.exists():
            return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
    return False


def default_cache_dir() -> Path:
    """Where gs:// models are cached: DREAMBOOTH_CACHE, else $XDG_CACHE_HOME/dreambooth, else ~/.cache/dreambooth.
    A container run as an arbitrary uid (Kubernetes runAsUser, OpenShift) often has HOME unset, '/' or read-only:
    then a per-uid folder in the temp dir, so loading still works (the cache just does not outlive the pod)."""
    if os.environ.get("DREAMBOOTH_CACHE"):
        return Path(os.environ["DREAMBOOTH_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "dreambooth"
    home = os.environ.get("HOME", "")  # not Path.home(): a uid with no passwd entry makes that raise
    if home and Path(home) != Path("/"):
        cache = Path(home) / ".cache" / "dreambooth"
        if _writable(cache):
            return cache
    return Path(tempfile.gettempdir()) / f"dreambooth-cache-{os.getuid()}"


# --- resolving a model URI to a local folder -------------------------------------------------------------------


def _gcs_content_key(uri: str) -> str:
    """A key of a gs:// model from object metadata (names, sizes, checksums), with no download."""
    prefix = storage.split_gcs(uri)[1].rstrip("/") + "/"
    h = hashlib.sha256()
    n = 0
    for blob in storage.list_objects(uri):
        h.update(
            f"{blob.name[len(prefix) :]}\0{blob.size}\0{blob.crc32c or ''}\0{blob.md5_hash or ''}\n".encode()
        )
        n += 1
    if n == 0:
        raise ModelLoadError(f"{uri}: no files under this prefix; point to a folder holding model_index.json")
    return h.hexdigest()


def check_no_pickle(local_dir: Path, allow_pickle: bool, uri: str) -> None:
    """Refuse a folder whose weights exist only as pickle files, unless the user opted in."""
    if allow_pickle:
        return
    pickles = [p for p in local_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    for p in pickles:
        if not any(p.parent.glob("*.safetensors")):
            raise ModelLoadError(
                f"{uri}: {p.relative_to(local_dir)} holds pickle weights, which can run code when loaded; "
                "convert them to safetensors, or set allow_pickle=true (--allow-pickle) if you trust the source"
            )


def resolve_model_dir(uri: str, *, allow_pickle: bool = False, cache_dir: str | Path | None = None) -> Path:
    """A local folder holding the model at `uri` (downloading gs:// once, keyed by content)."""
    uri = str(uri)
    if uri.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ModelLoadError(f"{uri}: a pickle checkpoint; convert it to a diffusers folder with safetensors")
    if storage.is_gcs(uri):
        key = _gcs_content_key(uri)
        local = Path(cache_dir or default_cache_dir()) / "models" / key
        if not (local / ".complete").exists():
            staging = local.with_name(key + ".partial")
            storage.delete_prefix(str(staging))
            storage.copy_prefix(uri, str(staging))
            storage.delete_prefix(str(local))
            os.replace(staging, local)
            (local / ".complete").write_text(uri + "\n")
        check_no_pickle(local, allow_pickle, uri)
        return local
    local = Path(uri).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{uri}: expected a model folder (with model_index.json or config.json)")
        check_no_pickle(local, allow_pickle, uri)
        return local
    if HUB_ID.match(uri) and not uri.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            ignore = None if allow_pickle else [f"*{s}" for s in PICKLE_SUFFIXES] + ["*.msgpack", "*.h5"]
            path = Path(snapshot_download(uri, ignore_patterns=ignore, cache_dir=cache_dir))
        except Exception as err:
            raise ModelLoadError(
                f"{uri}: not a local folder, and the hub could not serve it ({type(err).__name__}); "
                "copy the model to a folder or gs:// prefix and pass that instead"
            ) from None
        check_no_pickle(path, allow_pickle, uri)
        return path
    raise ModelLoadError(f"{uri}: no such folder; give a local diffusers folder, a gs:// prefix or a hub id")


_DIGESTS: dict[str, str] = {}


def _md5_b64(read_chunks) -> str:
    h = hashlib.md5(usedforsecurity=False)
    for chunk in read_chunks:
        h.update(chunk)
    return base64.b64encode(h.digest()).decode()


def _file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return _md5_b64(iter(lambda: f.read(1 << 20), b""))


def _digest_entries(uri: str, allow_pickle: bool) -> list[tuple[str, int, str]]:
    """(relative name, size, base64 MD5) of every file of the model, hidden files (cache markers) left out. On
    gs:// the MD5 is the object's own metadata (no download); a composite object has none and is read."""
    if storage.is_gcs(uri):
        prefix = storage.split_gcs(uri)[1].rstrip("/") + "/"
        entries = []
        for blob in storage.list_objects(uri):
            rel = blob.name[len(prefix) :]
            if rel.rsplit("/", 1)[-1].startswith("."):
                continue
            md5 = blob.md5_hash or base64.b64encode(storage.file_hash(blob.uri, "md5").digest()).decode()
            entries.append((rel, int(blob.size), md5))
        if not entries:
            raise ModelLoadError(
                f"{uri}: no files under this prefix; point to a folder holding model_index.json"
            )
        return entries
    local = resolve_model_dir(uri, allow_pickle=allow_pickle)
    return [
        (f.relative_to(local).as_posix(), f.stat().st_size, _file_md5(f))
        for f in local.rglob("*")
        if f.is_file() and not f.name.startswith(".")
    ]


def model_digest(uri: str, *, allow_pickle: bool = False) -> str:
    """A content digest of a model: sha256 over every file's relative name, size and MD5, cached per process.
    The same model gives the same digest as a gs:// prefix, a local folder or a /gcs/ mount of it, so prior-set
    reuse and identifier uniqueness do not depend on where a copy lives."""
    uri = str(uri)
    if uri not in _DIGESTS:
        h = hashlib.sha256()
        for rel, size, md5 in sorted(_digest_entries(uri, allow_pickle)):
            h.update(f"{rel}\0{size}\0{md5}\n".encode())
        _DIGESTS[uri] = h.hexdigest()
    return _DIGESTS[uri]


def is_lora_dir(local: Path) -> bool:
    """A LoRA folder: ours (the weights + dreambooth_lora.json), or a plain diffusers one, such as the output of
    diffusers' train_dreambooth_lora.py (the weights alone)."""
    return (local / LORA_WEIGHTS_NAME).exists() and not (local / "model_index.json").exists()


def read_lora_marker(local: Path) -> dict[str, Any]:
    """Our marker beside the adapter (base model, identifier, rank, ...); {} for a plain diffusers LoRA folder."""
    marker = local / LORA_MARKER_NAME
    return json.loads(marker.read_text()) if marker.exists() else {}


def lora_base_model(local: Path, uri: str, base_model: str | None = None) -> str:
    """The base model a LoRA folder applies to: `base_model` when given, else the one its marker names."""
    base = base_model or read_lora_marker(local).get("base_model")
    if not base:
        raise ModelLoadError(
            f"{uri}: a LoRA folder that does not name its base model (no {LORA_MARKER_NAME}); pass the model "
            "it was trained on with --base-model (base_model=...)"
        )
    return base


def pipeline_class_name(uri: str, *, allow_pickle: bool = False) -> str:
    """The diffusers pipeline class of a model (its model_index.json's `_class_name`; a LoRA folder's base's),
    read without loading or downloading weights."""
    uri = str(uri)
    if storage.is_gcs(uri):
        marker = storage.join(uri, LORA_MARKER_NAME)
        if storage.exists(marker):
            return pipeline_class_name(storage.read_json(marker)["base_model"], allow_pickle=allow_pickle)
        index = storage.join(uri, "model_index.json")
        if not storage.exists(index):
            raise ModelLoadError(f"{uri}: no model_index.json; a diffusers pipeline folder is needed")
        return storage.read_json(index)["_class_name"]
    local = resolve_model_dir(uri, allow_pickle=allow_pickle)
    if is_lora_dir(local):
        return pipeline_class_name(lora_base_model(local, uri), allow_pickle=allow_pickle)
    if not (local / "model_index.json").exists():
        raise ModelLoadError(f"{uri}: no model_index.json; a diffusers pipeline folder is needed")
    return json.loads((local / "model_index.json").read_text())["_class_name"]


def load_pipeline(
    uri: str,
    *,
    allow_pickle: bool = False,
    torch_dtype: Any = None,
    device: str | None = None,
    base_model: str | None = None,
    components: dict[str, Any] | None = None,
):
    """A diffusers pipeline from a model URI; a LoRA artifact loads its base model and applies the adapter.
    `components` replace the folder's own (by pipeline attribute: a quantized denoiser)."""
    from diffusers import DiffusionPipeline

    local = resolve_model_dir(uri, allow_pickle=allow_pickle)
    lora_dir = None
    if is_lora_dir(local):
        lora_dir = local
        local = resolve_model_dir(lora_base_model(local, uri, base_model), allow_pickle=allow_pickle)
    if not (local / "model_index.json").exists():
        raise ModelLoadError(
            f"{uri}: no model_index.json; a diffusers pipeline folder (or our LoRA folder) is needed"
        )
    kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True, **(components or {})}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{uri}: cannot load the pipeline: {err}") from None
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS_NAME)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD15_UNET_PARAMETERS = (
    859_520_964  # Stable Diffusion 1.5's UNet: the unit of the memory estimates (multi_subject.py)
)


def denoiser_parameter_count(uri: str, allow_pickle: bool = False) -> int:
    """Parameters of a diffusers model's denoiser (its unet/ or transformer/ folder), read from the safetensors
    headers (no weights loaded); 0 when there are none (pickled weights). SD 1.5: ~0.86 B; SDXL: ~2.6 B;
    FLUX.1: ~11.9 B."""
    import struct

    local = resolve_model_dir(uri, allow_pickle=allow_pickle)
    if is_lora_dir(local):
        local = resolve_model_dir(lora_base_model(local, uri), allow_pickle=allow_pickle)
    total = 0
    for f in sorted(
        [*(local / "unet").glob("*.safetensors"), *(local / "transformer").glob("*.safetensors")]
    ):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total
