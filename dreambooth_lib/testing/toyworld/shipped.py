"""The trained toy world shipped with the package (`dreambooth_lib/assets/toyworld/`): the model's and the toy
evaluators' weights in fp16 with their configs, the training record (config, seed, timings, accuracies) and a
SHA256SUMS of every file, which a test checks.

Tokenizer files are not shipped (5 MB): they are the real CLIP vocabulary, written from the packaged BPE file
when a working copy is made. `base_model` and `evaluators` make working copies (weights upcast to fp32, so every
loader and trainer sees ordinary fp32 models); `ship` replaces the shipped files from a training output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
DIGEST_FILE = "SHA256SUMS"
RECORD_FILE = "training.json"
# what ships, relative to a training output folder (tokenizer files excluded: regenerated)
MODEL_PARTS = ("model_index.json", "scheduler", "unet", "vae", "text_encoder")
EVALUATOR_FILES = {
    "dino": (
        "config.json",
        "model.safetensors",
        "probe_heads.safetensors",
        "probe.safetensors",
        "evaluator.json",
    ),
    "clip": ("config.json", "model.safetensors", "preprocessor_config.json", "evaluator.json"),
}


README = """# The toy world, trained

Written by `make toyworld` (`python -m dreambooth_lib.testing.toyworld.train --out build/toyworld --ship`): the
script is `dreambooth_lib/testing/toyworld/train.py`, its configuration and seed are in `training.json` (with the
timings, the VAE's PSNR and the probe's prompt-following accuracy), and `SHA256SUMS` lists every file here.

- `model/`: a Stable Diffusion 1.x-shaped diffusers folder (UNet, AutoencoderKL, CLIP text encoder over the real
  CLIP vocabulary; fp16). The tokenizer is not stored: `shipped.base_model(dir)` writes a working copy (fp32)
  with it, which `StableDiffusionPipeline.from_pretrained` loads.
- `evaluators/dino/`: the probe classifier's ViT (a DINO stand-in) and its heads; `evaluators/clip/`: a small
  CLIP trained on the world (a CLIP stand-in). Toys, labelled in their `evaluator.json`; `shipped.evaluators(dir)`
  writes working copies with a random-weight LPIPS beside them.
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_files(root: Path = ASSET_DIR) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != DIGEST_FILE)


def digests(root: Path = ASSET_DIR) -> dict[str, str]:
    """{relative path: sha256} of every shipped file but the digest file itself."""
    return {p.relative_to(root).as_posix(): _sha256(p) for p in shipped_files(root)}


def read_digest_file(root: Path = ASSET_DIR) -> dict[str, str]:
    rows = (line.split("  ", 1) for line in (root / DIGEST_FILE).read_text().splitlines() if line.strip())
    return {path: digest for digest, path in rows}


def _fp16_copy(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {
        k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src)).items()
    }
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _fp32_copy(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {
        k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src)).items()
    }
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _copy_tree(src: Path, dst: Path, convert) -> None:
    """Copy files from src to dst, safetensors through `convert` (fp16 for shipping, fp32 for working copies).
    Configs lose the path they were loaded from; a working copy's say float32: transformers 5 loads a model in its
    config's dtype."""
    for path in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / path.relative_to(src) if src.is_dir() else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            convert(path, target)
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            config.pop("_name_or_path", None)  # where a training process loaded it from: not ours to ship
            for key in ("dtype", "torch_dtype"):
                if key in config and convert is _fp32_copy:
                    config[key] = "float32"
            target.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, target)


def ship(train_out: str | Path, root: Path = ASSET_DIR) -> Path:
    """Replace the shipped toy world with a training output (`train.py --out`), fp16, and write SHA256SUMS."""
    train_out = Path(train_out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for part in MODEL_PARTS:
        _copy_tree(train_out / "model" / part, root / "model" / part, _fp16_copy)
    for name, files in EVALUATOR_FILES.items():
        for file in files:
            _copy_tree(train_out / "evaluators" / name / file, root / "evaluators" / name / file, _fp16_copy)
    shutil.copyfile(train_out / RECORD_FILE, root / RECORD_FILE)
    (root / "README.md").write_text(README)
    (root / DIGEST_FILE).write_text("".join(f"{d}  {p}\n" for p, d in digests(root).items()))
    return root


def training_record(root: Path = ASSET_DIR) -> dict:
    return json.loads((root / RECORD_FILE).read_text())


def base_model(out_dir: str | Path, root: Path = ASSET_DIR) -> Path:
    """A working copy of the shipped model: a diffusers folder (fp32, with the CLIP tokenizer) that
    `StableDiffusionPipeline.from_pretrained` and every step of the project load. Reused when already there."""
    from dreambooth_lib.models import write_clip_tokenizer

    out = Path(out_dir)
    if (out / "model_index.json").exists() and (out / "tokenizer" / "vocab.json").exists():
        return out
    for part in MODEL_PARTS:
        _copy_tree(root / "model" / part, out / part, _fp32_copy)
    write_clip_tokenizer(out / "tokenizer")
    return out


def evaluators(out_dir: str | Path, root: Path = ASSET_DIR) -> dict[str, str]:
    """Working copies of the toy evaluators in the formats the evaluation loads: {"dino": ViTModel folder (the
    probe), "clip": CLIPModel folder, "lpips": random-weight LPIPS file}; each labelled by an evaluator.json."""
    from dreambooth_lib.models import write_clip_tokenizer
    from dreambooth_lib.testing.toyworld.evaluators import write_lpips

    out = Path(out_dir)
    paths = {"dino": out / "dino", "clip": out / "clip", "lpips": out / "lpips.safetensors"}
    if not (paths["dino"] / "evaluator.json").exists():
        _copy_tree(root / "evaluators" / "dino", paths["dino"], _fp32_copy)
    if not (paths["clip"] / "vocab.json").exists():
        _copy_tree(root / "evaluators" / "clip", paths["clip"], _fp32_copy)
        write_clip_tokenizer(paths["clip"])
    if not paths["lpips"].exists():
        write_lpips(paths["lpips"], seed=0)
    return {k: str(v) for k, v in paths.items()}
