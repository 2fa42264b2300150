"""The class-prior image set: 'a [class]' samples of the frozen base model, content-addressed and shared per class.

Prior preservation (the paper's Eq. 2) needs a few hundred images of the class drawn from the model before
fine-tuning. They depend only on the base model and the sampling settings, never on the subject, so the set
lives at `root/<prior_set_key>/` where the key hashes exactly those inputs: a second subject of the same class
on the same base model finds the set and pays nothing; asking for more images extends it. Every image has its
own seed (`image_seed(seed, i)`) and a fixed place in a fixed-size batch, so image i has the same pixels whether
it was made in the first run, an extension, or a rerun after an interruption (for the same batch size: a batch's
shape changes float rounding). Each is written atomically, so a rerun continues from the images that exist and
never rewrites them.

The set's record, prior_set.json, is its publication: it is written after the images it counts, and readers
(`load_prior_images`, `open_artifact`) take images 0..count-1 of the record and nothing else, so a reader during
an extension (or after one was interrupted) sees the old complete set or the new one, never a mix. A record's
count only grows (a conditional write), so a slower writer of a smaller set never hides a larger one.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time

from pydantic import BaseModel

from dreambooth_lib import models, storage
from dreambooth_lib.config import PriorConfig
from dreambooth_lib.errors import ConfigError, PreconditionFailed, StorageError
from dreambooth_lib.images import png_bytes
from dreambooth_lib.models import sampling

SET_RECORD_NAME = "prior_set.json"
IMAGE_NAME = re.compile(r"^(\d{6})\.png$")
KEY_HEX_CHARS = 16  # 64 bits: collisions are out of reach for any number of cached sets
RECORD_WRITE_ATTEMPTS = 20  # conditional rewrites of prior_set.json racing other writers of the same set


class PriorResult(BaseModel):
    """What a prior run produced: the set folder and the first `num_images` images of it."""

    uri: str  # the set folder root/<key>; "" when num_images is 0
    key: str
    class_prompt: str
    num_images: int
    images: list[str]
    generated: int  # images sampled by this call
    reused: int  # images found already in the set
    model_digest: str
    sampler: str
    steps: int
    # the scale the images were drawn with; None: the pipeline default, not known until a pipeline was loaded
    guidance_scale: float | None
    resolution: int
    seed: int
    wall_time_s: float
    mode: str = (
        "sampled"  # "model_output": no images; training's prior target is the frozen model's prediction
    )

    def write(self, uri: str) -> None:
        """Store this result as JSON at `uri` (the caller picks the place, e.g. <run_dir>/prior.json)."""
        storage.write_json(uri, self.model_dump(mode="json"))


class Preservation(BaseModel):
    """Whether training keeps the class prior (the second term of Eq. 2) and the λ it trains with."""

    on: bool
    prior_loss_weight: float  # λ as training uses it: 0 when preservation is off
    samples: bool = False  # whether prior images are sampled (not for the model-output prior, nor when off)
    warning: str | None = None  # the settings disagreed (no images, λ > 0): what was done and how to say it


def preservation(
    num_images: int,
    prior_loss_weight: float,
    *,
    num_images_name: str = "prior.num_images",
    weight_name: str = "train.prior_loss_weight",
    mode: str = "sampled",
) -> Preservation:
    """Either setting 0 turns prior preservation off: no prior image is sampled and λ is 0. The model-output prior
    (`mode`) needs no images: it is on with any λ > 0, and samples nothing.

    No images with λ > 0 is read as "off" rather than refused: a user who asks for no prior images expects none,
    and a run that stops at training (after ingest, identifier and prior) for it would waste the set-up; the
    warning says how to state it without one. The names are the caller's (a RunConfig's fields, or a
    pipeline's parameters), so the warning names the input the user set.
    """
    if mode == "model_output" and prior_loss_weight > 0:
        return Preservation(on=True, prior_loss_weight=prior_loss_weight, samples=False)
    if num_images > 0 and prior_loss_weight > 0:
        return Preservation(on=True, prior_loss_weight=prior_loss_weight, samples=True)
    warning = None
    if prior_loss_weight > 0:
        warning = (
            f"{num_images_name} is 0 but {weight_name} is {prior_loss_weight}: prior preservation is off (no "
            f"class-prior images, λ treated as 0); set {weight_name}: 0 to say so, or {num_images_name} > 0 "
            "(the paper: 200-1000) to keep the prior"
        )
    return Preservation(on=False, prior_loss_weight=0.0, warning=warning)


def class_prompt(class_noun: str) -> str:
    """The paper's class prompt: 'a [class noun]', the same prompt training pairs with the prior images."""
    noun = class_noun.strip()
    if not noun:
        raise ConfigError("class_noun is empty; give the subject's class, e.g. 'dog' or 'backpack'")
    return f"a {noun}"


def key_fields(
    model_digest: str,
    class_prompt: str,
    sampler: str,
    steps: int,
    guidance: float | None,
    resolution: int,
    seed: int,
    family: str,
) -> dict:
    """Everything that decides the pixels of a set: the model, its family, the sampler it samples with
    (`ModelFamily.sampler_name`), the prompt and the sampling settings, with normalized types (7 and 7.0 are the
    same guidance and must give the same key). `guidance` None means "the pipeline's default", which is a function
    of the model and so covered by its digest."""
    return {
        "family": str(family),
        "model_digest": str(model_digest),
        "class_prompt": str(class_prompt),
        "sampler": str(sampler),
        "steps": int(steps),
        "guidance_scale": None if guidance is None else float(guidance),
        "resolution": int(resolution),
        "seed": int(seed),
    }


def prior_set_key(fields: dict) -> str:
    """A short hex sha256 of the canonical JSON of a set's `key_fields`."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def _existing_indices(set_uri: str) -> set[int]:
    found = set()
    for uri in storage.list_files(set_uri, recursive=False):
        m = IMAGE_NAME.match(storage.basename(uri))
        if m:
            found.add(int(m.group(1)))
    return found


def _contiguous_count(indices: set[int]) -> int:
    """How many images 0..k-1 exist without a gap: the set's size (an image after a gap is not counted)."""
    n = 0
    while n in indices:
        n += 1
    return n


def load_prior_images(uri: str, n: int | None = None) -> list[str]:
    """The URIs of the images a set's record counts, 000000.png, 000001.png, ..., the first `n` if given. Images
    not in the record (an extension still being written) are not the set's yet; an image of it that was lost
    since ends the set there (the gap-free run from 0)."""
    record, _ = _read_record(uri)
    published = int(record.get("count", 0))
    count = _contiguous_count({i for i in _existing_indices(uri) if i < published})
    if n is not None:
        if n > count:
            raise StorageError(
                f"{uri}: holds {count} prior images, {n} were asked for; "
                f"extend the set with `dreambooth prior --num-images {n}` (same settings) or ask for fewer"
            )
        count = n
    return [storage.join(uri, image_name(i)) for i in range(count)]


def _read_record(set_uri: str) -> tuple[dict, int]:
    """The set's prior_set.json ({} when there is none) and its generation, for a conditional rewrite."""
    record_uri = storage.join(set_uri, SET_RECORD_NAME)
    data, generation = storage.read_bytes_with_generation(record_uri)
    if data is None:
        return {}, generation
    try:
        return json.loads(data), generation
    except json.JSONDecodeError as err:
        raise StorageError(
            f"{record_uri}: not valid JSON ({err}); delete it and run the prior step again"
        ) from None


def _check_record(set_uri: str, fields: dict) -> dict:
    """The set's prior_set.json (or {}), refusing a folder that holds a set made with other settings."""
    record_uri = storage.join(set_uri, SET_RECORD_NAME)
    record, _ = _read_record(set_uri)
    if not record:
        return {}
    differing = [k for k, v in fields.items() if record.get(k) != v]
    if differing:
        raise StorageError(
            f"{record_uri}: this folder holds a prior set made with other settings ({', '.join(differing)} differ); "
            "it is not a set of this cache: delete the folder or pick another prior root"
        )
    return record


def _write_record(
    set_uri: str, key: str, fields: dict, model_uri: str, guidance_used: float | None, batch_size: int
) -> int:
    """Publish the images written so far: prior_set.json with `count`, the gap-free run of images in the folder
    (each is whole: written atomically), unless another writer already published at least as many. The write is
    conditional on the record read, so of two writers racing, the one with fewer images never wins.

    `batch_size` is recorded because pixels are identical to the last bit only for the same batch size (batch
    shape changes float rounding, by about one grey level): extend a set with the batch size that made it.
    """
    count = _contiguous_count(_existing_indices(set_uri))
    record_uri = storage.join(set_uri, SET_RECORD_NAME)
    for _ in range(RECORD_WRITE_ATTEMPTS):
        published, generation = _read_record(set_uri)
        if published and int(published.get("count", 0)) >= count:
            return int(published["count"])
        record = {
            "key": key,
            **fields,
            "count": count,
            "model": model_uri,
            "guidance_scale_used": guidance_used,
            "batch_size": batch_size,
        }
        try:
            storage.write_json(record_uri, record, if_generation_match=generation)
            return count
        except PreconditionFailed:
            continue  # another writer published meanwhile: compare with what it wrote
    raise StorageError(
        f"{record_uri}: still changing after {RECORD_WRITE_ATTEMPTS} attempts (many writers extending one set); "
        "run the prior step again"
    )


def run(
    base_model: str,
    class_noun: str,
    config: PriorConfig,
    root: str,
    resolution: int,
    allow_pickle: bool = False,
) -> PriorResult:
    """Make sure root/<key>/ holds `config.num_images` class-prior images; sample only the missing ones."""
    t0 = time.perf_counter()
    prompt = class_prompt(class_noun)
    size = int(config.resolution or resolution)
    n = config.num_images if config.mode == "sampled" else 0
    if n == 0:  # off, or the model-output prior: nothing to load, hash or write
        return PriorResult(
            uri="",
            key="",
            class_prompt=prompt,
            num_images=0,
            images=[],
            generated=0,
            reused=0,
            model_digest="",
            sampler=config.sampler,
            steps=config.steps,
            guidance_scale=config.guidance_scale,
            resolution=size,
            seed=config.seed,
            wall_time_s=round(time.perf_counter() - t0, 3),
            mode=config.mode,
        )

    digest = models.model_digest(base_model, allow_pickle=allow_pickle)
    family = models.family_of_model(base_model, allow_pickle=allow_pickle)
    sampler = family.sampler_name(config.sampler)
    fields = key_fields(
        digest, prompt, sampler, config.steps, config.guidance_scale, size, config.seed, family.name
    )
    key = prior_set_key(fields)
    set_uri = storage.join(root, key)
    record = _check_record(set_uri, fields)
    guidance_used = record.get("guidance_scale_used", config.guidance_scale)

    existing = _existing_indices(set_uri)
    # images after a gap were drawn with the same seeds, so they are kept, not redrawn
    missing = [i for i in range(_contiguous_count(existing), n) if i not in existing]
    if missing:
        guidance_used = _sample_missing(base_model, config, prompt, size, set_uri, missing, allow_pickle)
    if missing or record.get("count") != _contiguous_count(existing):
        _write_record(set_uri, key, fields, base_model, guidance_used, config.batch_size)

    return PriorResult(
        uri=set_uri,
        key=key,
        class_prompt=prompt,
        num_images=n,
        images=[storage.join(set_uri, image_name(i)) for i in range(n)],
        generated=len(missing),
        reused=n - len(missing),
        model_digest=digest,
        sampler=sampler,
        steps=config.steps,
        guidance_scale=guidance_used,
        resolution=size,
        seed=config.seed,
        wall_time_s=round(time.perf_counter() - t0, 3),
    )


def _sample_missing(
    base_model: str,
    config: PriorConfig,
    prompt: str,
    size: int,
    set_uri: str,
    missing: list[int],
    allow_pickle: bool,
) -> float | None:
    """Draw images `missing` of the set into `set_uri`; returns the guidance scale they were drawn with."""
    from tqdm import tqdm

    device = models.resolve_device(config.device)
    pipe = models.load_pipeline(
        base_model,
        allow_pickle=allow_pickle,
        torch_dtype=models.resolve_dtype(config.dtype, device),
        device=device,
    )
    if config.compile:
        sampling.compile_for_sampling(pipe)
    guidance_used = (
        sampling.default_guidance_scale(pipe) if config.guidance_scale is None else config.guidance_scale
    )
    bs = config.batch_size
    wanted = set(missing)
    with tqdm(total=len(missing), desc=f"prior '{prompt}'", unit="img", file=sys.stderr) as bar:
        for first in sorted({i // bs * bs for i in missing}):
            # Batches sit at fixed places (indices k*bs .. k*bs+bs-1) and are always full: float rounding
            # depends on the batch's shape, so image i gets identical pixels only when it is always drawn in
            # the same batch. The neighbours already on disk (or past num_images) are drawn and dropped.
            batch = list(range(first, first + bs))
            images = sampling.sample_images(
                pipe,
                [prompt] * bs,
                [sampling.image_seed(config.seed, i) for i in batch],
                steps=config.steps,
                sampler=config.sampler,
                guidance_scale=config.guidance_scale,
                resolution=size,
                batch_size=bs,
            )
            # one image at a time and atomically: an interruption loses at most the batch in flight
            written = 0
            for i, image in zip(batch, images, strict=True):
                if i in wanted:
                    storage.write_bytes(storage.join(set_uri, image_name(i)), png_bytes(image))
                    written += 1
            bar.update(written)
    return guidance_used


# --- the prior set as a task's artifact ------------------------------------------------------------------------------
# On Kubeflow each task is its own pod: the launcher stages in only declared input artifacts, so the prior set
# travels as a Dataset artifact, never as a path string. The artifact holds a reference record and, when the set
# was sampled into the artifact itself, the images; a shared set (prior.root, a durable gs:// cache named by the
# pipeline) is referenced by its URI and read from there.

ARTIFACT_RECORD_NAME = "prior_set_ref.json"


class PriorSetRef(BaseModel):
    """What a consumer of a prior-set artifact needs: the images' URIs (in the consumer's own view) and the key."""

    key: str
    uri: str  # the folder holding the images; "" for an empty set
    images: list[str]
    mode: str = "sampled"  # "model_output": no images, by design (training takes the frozen model's targets)


def write_artifact(artifact_dir: str, result: PriorResult) -> None:
    """Record `result` in the prior task's output artifact; the images are named relative to the artifact when the
    set lives inside it (the consumer's local path differs from the producer's), else by their durable URI."""
    inside = bool(result.uri) and _is_inside(result.uri, artifact_dir)
    record = {
        "key": result.key,
        "num_images": result.num_images,
        "class_prompt": result.class_prompt,
        "model_digest": result.model_digest,
        # relative to the artifact, or the shared set's URI; "" when prior preservation is off
        "set": _relative(result.uri, artifact_dir) if inside else result.uri,
        "inside_artifact": inside,
        "mode": result.mode,
    }
    storage.write_json(storage.join(artifact_dir, ARTIFACT_RECORD_NAME), record)


def open_artifact(artifact_dir: str) -> PriorSetRef:
    """The prior set a declared input artifact refers to, with every image checked to exist where it is read."""
    record_uri = storage.join(artifact_dir, ARTIFACT_RECORD_NAME)
    if not storage.exists(record_uri):
        raise StorageError(
            f"{record_uri}: missing; the prior_set input must be the output artifact of the class-prior step "
            "(make_prior_set)"
        )
    record = storage.read_json(record_uri)
    mode = record.get("mode", "sampled")
    if not record["set"]:
        return PriorSetRef(key=record["key"], uri="", images=[], mode=mode)
    set_uri = storage.join(artifact_dir, record["set"]) if record["inside_artifact"] else record["set"]
    images = load_prior_images(set_uri, record["num_images"])
    return PriorSetRef(key=record["key"], uri=set_uri, images=images, mode=mode)


def _is_inside(uri: str, folder: str) -> bool:
    return uri.rstrip("/").startswith(folder.rstrip("/") + "/")


def _relative(uri: str, folder: str) -> str:
    return uri.rstrip("/")[len(folder.rstrip("/")) + 1 :]
