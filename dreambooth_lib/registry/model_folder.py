"""What a registered model folder is: a full diffusers pipeline or a LoRA adapter, and which diffusers pipeline
class loads it (by the base model's family). Torch-free: it reads file names and model_index.json only."""

from __future__ import annotations

from dreambooth_lib import storage
from dreambooth_lib.artifacts import LORA_WEIGHTS_NAME

# family -> the diffusers class of its pipelines (models.families' `pipeline_class`, kept here so the registry
# stays torch-free; tests/test_registry.py checks the two agree)
PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def model_mode(model_files: list[str]) -> str:
    """ "lora" for an adapter folder (it holds the LoRA weights file), else "full" (a diffusers pipeline)."""
    return "lora" if any(storage.basename(f) == LORA_WEIGHTS_NAME for f in model_files) else "full"


def pipeline_class(family: str | None) -> str:
    """The diffusers class that loads a model of `family`; DiffusionPipeline, which picks the class from the
    folder's model_index.json itself, when the family is unknown."""
    return PIPELINE_CLASSES.get(family or "", "DiffusionPipeline")


def model_family(model_dir: str, mode: str, base_model: str) -> str | None:
    """The family of a model, from the `_class_name` of a model_index.json: the model's own (a full pipeline)
    or its base model's (a LoRA adapter, when the base is a folder this machine can read). None when unknown,
    e.g. for a hub id: nothing is downloaded for a card."""
    folder = model_dir if mode == "full" else base_model
    if not folder:
        return None
    index_uri = storage.join(folder, "model_index.json")
    try:
        index = storage.read_json(index_uri) if storage.exists(index_uri) else None
    except Exception:  # noqa: BLE001 - no credentials, no permission, bad JSON: the family only refines a hint
        return None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    return next((family for family, name in PIPELINE_CLASSES.items() if name == class_name), None)
