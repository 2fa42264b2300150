"""Publishing a trained subject: out/model (a diffusers folder, or a LoRA folder) and then out/train_summary.json.

The model is written into out/model.partial and renamed to out/model; the summary comes last, so its presence
means the run finished (a reader never sees a half-written model as done). The Model artifact of the fine-tune
task is exactly this: the model and its summary, no checkpoint bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreambooth_lib import models, storage
from dreambooth_lib.artifacts import MODEL_FOLDER, MODEL_MARKER_NAME, SUMMARY_NAME
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.models import lora
from dreambooth_lib.train.results import TrainResult
from dreambooth_lib.train.subjects import TrainSubject
from dreambooth_lib.train.trainer import Trainer


def publish(out: str, write_model: Callable[[Path], None], started: float, **fields: Any) -> TrainResult:
    """Write the model with `write_model(folder)` and publish it with its summary. `fields` are TrainResult's, less
    what is known only here (model_uri, final_loss, wall_time_s since `started`)."""
    model_uri = storage.join(out, MODEL_FOLDER)
    with storage.local_dir_for_writing(out, last=(SUMMARY_NAME,)) as stage:
        partial = Path(stage) / "model.partial"
        storage.delete_prefix(str(partial))
        write_model(partial)
        storage.delete_prefix(str(Path(stage) / MODEL_FOLDER))
        storage.rename_prefix(str(partial), str(Path(stage) / MODEL_FOLDER))
        losses = fields["losses"]
        result = TrainResult(
            model_uri=model_uri,
            final_loss=losses[-1][1] if losses else float("nan"),
            wall_time_s=time.perf_counter() - started,
            **fields,
        )
        storage.write_json(Path(stage) / SUMMARY_NAME, result.model_dump(mode="json"))
    return result


def write_model(
    folder: Path,
    pipe,
    t: Trainer,
    subject: TrainSubject,
    config: TrainConfig,
    base_model: str,
    base_digest: str,
) -> None:
    """LoRA: the adapter(s) in the family's `load_lora_weights` format + dreambooth_lora.json. Full: the whole
    pipeline with the trained modules (safetensors) + dreambooth_model.json. For a pack, `t.grouped` must
    already hold this subject's adapter in the peft layers (`GroupedAdapters.load`)."""
    marker = {
        "base_model": base_model,
        "base_model_digest": base_digest,
        "family": t.family.name,
        "identifier": subject.identifier,
        "class_noun": subject.class_noun,
    }
    if config.mode == "lora":
        marker |= {"rank": config.lora_rank, "alpha": lora.lora_alpha(config.lora_rank, config.lora_alpha)}
        t.family.save_lora(folder, t.denoiser, t.trained_encoders, marker)
        return
    t.family.export_full(pipe, folder, {t.family.denoiser_name: t.denoiser, **t.trained_encoders})
    _keep_base_tokenizer_files(base_model, folder)
    marker |= {
        "mode": "full",
        "instance_prompt": subject.instance_prompt,
        "class_prompt": subject.class_prompt,
    }
    storage.write_json(folder / MODEL_MARKER_NAME, marker)


def _keep_base_tokenizer_files(base_model: str, folder: Path) -> None:
    """save_pretrained writes only the tokenizer files of the installed transformers; keep the base's others
    (vocab.json, merges.txt) so older readers load the model too."""
    base = models.resolve_model_dir(base_model, allow_pickle=True)
    for tokenizer in sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("tokenizer")):
        for f in storage.list_files(str(tokenizer), recursive=False):
            target = folder / tokenizer.name / storage.basename(f)
            if not target.exists():
                storage.copy(f, str(target))
