"""Packed LoRA training of a batch's subjects: a thin adapter over dreambooth_lib.runs.batch.pack.train_pack."""

from kfp import dsl
from kfp.dsl import Markdown, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_packed_loras(
    subjects: list,
    base_model: str,
    batch_root: str,
    job_id: str,
    packing: Output[Markdown],
    pack_size: int,
    resolution: int,
    steps: int,
    prior_loss_weight: float,
    prior_size: int,
    mode: str,
    prior_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    run_options: dict = {},  # noqa: B006
    allow_pickle: bool = False,
) -> int:
    """Train the planned LoRA subjects K at a time in one UNet batch, each into `<subject run_dir>/train`.

    Runs after the class loop (the prior sets are in the shared cache) and before the subject loop, whose tasks
    find their model trained and go on to evaluate and register it. `pack_size` 0 packs as many subjects as
    the GPU's free memory holds. For full fine-tunes, text-encoder training or a pack size of 1 it does nothing
    and each subject trains in its own task. A subject that fails here is trained alone by its subject task.
    Takes the same parameters as personalize_subject so both build the same RunConfig (batch_personalize holds
    their defaults). Returns how many subjects were trained in packs; `<batch_root>/<job_id>/packed.json` lists
    each subject's outcome.
    """
    from dreambooth_lib import storage
    from dreambooth_lib.runs.batch.pack import train_pack
    from dreambooth_lib.runs.batch.subject import subject_run_values

    statuses = []
    if subjects:
        # every planned subject carries the plan's prior root: where the class loop put the prior sets
        values = subject_run_values(
            run_options, resolution=resolution, steps=steps, prior_loss_weight=prior_loss_weight,
            prior_size=prior_size, prior_root=subjects[0]["prior_root"], mode=mode, prior_options=prior_options,
        )  # fmt: skip
        statuses = train_pack(
            subjects, base_model, batch_root, job_id, values, pack_size=pack_size, allow_pickle=allow_pickle
        )
    lines = ["# Packed LoRA training", ""]
    lines += [
        f"- {p.subject}: " + ("trained in a pack" if p.packed else f"trains alone ({p.reason})")
        for p in statuses
    ]
    if not statuses:
        lines.append("No packing (full fine-tune, text encoder trained, pack size 1 or one subject).")
    storage.write_text(packing.path, "\n".join(lines) + "\n")
    packed_count = sum(p.packed for p in statuses)
    packing.metadata.update({"packed": packed_count, "subjects": len(subjects)})
    print("\n".join(lines))
    return packed_count
