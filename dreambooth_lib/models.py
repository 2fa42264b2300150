"""Model loading (local folder, gs:// prefix, hub id; safetensors only unless asked) and the tiny test model.

A model URI is one of:
- a local diffusers folder (holds `model_index.json`), or a single model folder (`config.json`, e.g. CLIP, DINO);
- a `gs://` prefix holding such a folder, downloaded once into a cache folder keyed by the objects' content;
- a hub id (`org/name`), fetched with huggingface_hub into its own cache (no hub is reachable from CI);
- a LoRA artifact of ours: a folder with `pytorch_lora_weights.safetensors` and `dreambooth_lora.json`, whose
  `base_model` names the model the adapter applies to.

Pickle weights (.bin/.ckpt/.pt/.pth) can run arbitrary code when loaded: they are refused unless `allow_pickle`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from dreambooth_lib import storage
from dreambooth_lib.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_MARKER_NAME = "dreambooth_lora.json"
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


# --- the real CLIP BPE vocabulary ------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the BPE works on these characters)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@lru_cache(maxsize=1)
def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab (49408 tokens) and merges of CLIP's tokenizer, derived exactly as OpenAI CLIP / open_clip derive them
    from `bpe_simple_vocab_16e6.txt.gz` (shipped as package data, MIT-licensed, see data/LICENSE.clip-bpe)."""
    raw = resources.files("dreambooth_lib").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) with the real 49408-token vocabulary."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:  # transformers >= 5 takes the vocabulary itself
        tok = CLIPTokenizer(
            vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=77
        )
    except TypeError:  # transformers 4
        tok = CLIPTokenizer(
            vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"), model_max_length=77
        )
    tok.save_pretrained(out)
    return out


# --- resolving a model URI to a local folder -------------------------------------------------------------------


def _gcs_content_key(uri: str) -> str:
    """A key of a gs:// model from object metadata (names, sizes, checksums), with no download."""
    from dreambooth_lib.storage import _client, split_gcs

    bucket, name = split_gcs(uri)
    prefix = name.rstrip("/") + "/"
    h = hashlib.sha256()
    n = 0
    for blob in sorted(_client().list_blobs(bucket, prefix=prefix), key=lambda b: b.name):
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


def model_digest(uri: str, *, allow_pickle: bool = False) -> str:
    """A content digest of a model (sha256 over relative names and file hashes), cached per process."""
    uri = str(uri)
    if storage.is_gcs(uri):
        return _gcs_content_key(uri)
    if uri not in _DIGESTS:
        local = resolve_model_dir(uri, allow_pickle=allow_pickle)
        h = hashlib.sha256()
        for f in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(f"{f.relative_to(local).as_posix()}\0{storage.sha256_file(f)}\n".encode())
        _DIGESTS[uri] = h.hexdigest()
    return _DIGESTS[uri]


def is_lora_dir(local: Path) -> bool:
    return (local / LORA_MARKER_NAME).exists() and (local / LORA_WEIGHTS_NAME).exists()


def read_lora_marker(local: Path) -> dict[str, Any]:
    return json.loads((local / LORA_MARKER_NAME).read_text())


def load_pipeline(
    uri: str,
    *,
    allow_pickle: bool = False,
    torch_dtype: Any = None,
    device: str | None = None,
    base_model: str | None = None,
):
    """A diffusers pipeline from a model URI; a LoRA artifact loads its base model and applies the adapter."""
    from diffusers import DiffusionPipeline

    local = resolve_model_dir(uri, allow_pickle=allow_pickle)
    lora_dir = None
    if is_lora_dir(local):
        lora_dir = local
        base_model = base_model or read_lora_marker(local)["base_model"]
        local = resolve_model_dir(base_model, allow_pickle=allow_pickle)
    if not (local / "model_index.json").exists():
        raise ModelLoadError(
            f"{uri}: no model_index.json; a diffusers pipeline folder (or our LoRA folder) is needed"
        )
    kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
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


# torch.compile's backend for every compiled module (training and sampling UNets). Tests swap in "aot_eager": the
# same graph capture and call path, without the minutes of C++/Triton code generation inductor spends on a UNet.
COMPILE_BACKEND = "inductor"


def compile_module(module):
    """`torch.compile(module)` with the project's backend; compiles lazily, at the first call."""
    import torch

    return torch.compile(module, backend=COMPILE_BACKEND)


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for inference: `auto` is fp16 on GPUs (half the memory and time), fp32 on CPUs (no fast
    fp16 kernels there)."""
    import torch

    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


# --- the tiny model --------------------------------------------------------------------------------------------


def sd_pipeline_from_parts(unet, vae, text_encoder, tokenizer):
    """An SD-1.x pipeline around the given modules, with SD 1.x's training noise schedule and no safety checker."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(
        steps_offset=1,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vae(seed: int, sample_size: int, **overrides):
    """The tiny 2-level VAE of diffusers' test components (downsampling x2)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
        **overrides,
    )


def _tiny_text_config():
    """A 5-layer, 32-wide CLIP text encoder config over the real CLIP vocabulary."""
    from transformers import CLIPTextConfig

    vocab, _ = clip_bpe_vocab_and_merges()
    return CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        projection_dim=32,
    )


def _save_tiny(pipe, out: Path, tok_dir: Path, tokenizer_folders: tuple[str, ...]) -> Path:
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # slow-tokenizer files too, for transformers 4 readers
        for folder in tokenizer_folders:
            shutil.copyfile(tok_dir / name, out / folder / name)
    storage.delete_prefix(str(tok_dir))
    return out


def build_tiny_model(out_dir: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny SD-1.x-shaped pipeline (random weights, real CLIP vocabulary) of a few MB, deterministic in seed.

    Shapes follow diffusers' own test components (`get_dummy_components`): a 2-level UNet with cross-attention,
    a 2-level VAE (downsampling x2, so 64 px images make 32 px latents), and a 5-layer CLIP text encoder.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _tiny_vae(seed + 1, sample_size)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    return _save_tiny(
        sd_pipeline_from_parts(unet, vae, text_encoder, tokenizer), out, tok_dir, ("tokenizer",)
    )


def is_sdxl(pipe) -> bool:
    """An SDXL-shaped pipeline: two text encoders, and a UNet conditioned on pooled text and size/crop ids."""
    return getattr(pipe, "text_encoder_2", None) is not None


def sdxl_pipeline_from_parts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
    """An SDXL pipeline around the given modules, with SDXL's training noise schedule and no watermarker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        steps_offset=1,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_tiny_sdxl_model(out_dir: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny SDXL-shaped pipeline (random weights, the real CLIP vocabulary in both tokenizers), a few MB.

    Shapes follow diffusers' SDXL test components: a UNet with `addition_embed_type="text_time"` (pooled text
    embeddings + 6 size/crop ids), cross-attention over both encoders' hidden states concatenated (32 + 32), a
    CLIPTextModel and a CLIPTextModelWithProjection.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids × 8 + the pooled text embedding
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = _tiny_vae(seed + 1, sample_size, scaling_factor=0.13025)  # SDXL's VAE scale
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config())
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = sdxl_pipeline_from_parts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer)
    return _save_tiny(pipe, out, tok_dir, ("tokenizer", "tokenizer_2"))


SD15_UNET_PARAMETERS = (
    859_520_964  # Stable Diffusion 1.5's UNet: the unit of the memory estimates (packed.py)
)


def unet_parameter_count(uri: str, allow_pickle: bool = False) -> int:
    """Parameters of a diffusers model's UNet, read from its safetensors headers (no weights loaded); 0 when
    there are none (a pickled UNet). SD 1.5: ~0.86 B; SDXL: ~2.6 B."""
    import struct

    local = resolve_model_dir(uri, allow_pickle=allow_pickle)
    if is_lora_dir(local):
        local = resolve_model_dir(read_lora_marker(local)["base_model"], allow_pickle=allow_pickle)
    total = 0
    for f in sorted((local / "unet").glob("*.safetensors")):
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
