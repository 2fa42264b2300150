"""Base models: loading (local folder, gs://, hub id; safetensors), the CLIP tokenizer, device and dtype, LoRA,
sampling, and the base-model families."""

from dreambooth_lib.models.device import compile_module, peak_memory_bytes, resolve_device, resolve_dtype
from dreambooth_lib.models.families import (
    FAMILIES,
    ModelFamily,
    PromptConditioning,
    family_named,
    family_of,
    family_of_model,
)
from dreambooth_lib.models.loading import (
    HUB_ID,
    LORA_MARKER_NAME,
    LORA_WEIGHTS_NAME,
    PICKLE_SUFFIXES,
    SD15_UNET_PARAMETERS,
    check_no_pickle,
    default_cache_dir,
    denoiser_parameter_count,
    is_lora_dir,
    load_pipeline,
    lora_base_model,
    model_digest,
    pipeline_class_name,
    read_lora_marker,
    resolve_model_dir,
)
from dreambooth_lib.models.tokenizer import clip_bpe_vocab_and_merges, write_clip_tokenizer
