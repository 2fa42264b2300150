"""Training checkpoints that resume bit-identically: weights, optimizer, every RNG, step and losses; no pickle.

A checkpoint is a folder `<root>/step-XXXXXXX/` (local or gs://) holding
    weights.safetensors     the trained parameters, by name
    optimizer.safetensors   the optimizer's tensors (Adam moments, step counts), keyed `state/<i>/<name>`
    rng.safetensors         torch CPU/CUDA states and each subject's training-generator state (byte tensors)
    state.json              everything else: optimizer param groups and scalars, python/numpy RNG, losses, ...
    checkpoint_manifest.json   written LAST, with the sha256 of every file above
A folder without a manifest is an interrupted write and is ignored. Nothing is unpickled: torch.load of a
checkpoint from a shared bucket could run code, safetensors and JSON cannot.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dreambooth_lib import storage
from dreambooth_lib.artifacts import CHECKPOINT_MANIFEST_NAME as MANIFEST_NAME
from dreambooth_lib.errors import TrainingError

STEP_DIR = re.compile(r"^step-(\d{7,})$")
FORMAT_VERSION = 2  # 2: one training generator per subject, also for a single subject


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:07d}"


@dataclass
class Checkpoint:
    """The restorable state of a training run at the end of `step`."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    rng: dict[str, Any]  # see capture_rng_state
    info: dict[str, Any] = field(default_factory=dict)  # losses, fingerprint, ... (JSON)
    uri: str | None = None


# --- RNG ---------------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    """Every RNG a step may touch: torch CPU, each CUDA device, python, numpy and each subject's training
    generator."""
    version, mt_state, gauss_next = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
        "python": [version, list(mt_state), gauss_next],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng_state(state: dict[str, Any], generators: Sequence[torch.Generator]) -> None:
    saved = state.get("generators") or []
    if len(saved) != len(generators):
        raise TrainingError(
            f"the checkpoint holds {len(saved)} per-subject generator states, this run has {len(generators)}"
        )
    for g, g_state in zip(generators, saved, strict=True):
        g.set_state(g_state)
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_rng(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": state["torch_cpu"]}
    for i, s in enumerate(state["torch_cuda"]):
        tensors[f"torch_cuda/{i}"] = s
    for i, s in enumerate(state.get("generators") or []):
        tensors[f"generators/{i}"] = s
    return tensors, {
        "python": state["python"],
        "numpy": state["numpy"],
        "cuda_devices": len(state["torch_cuda"]),
        "generators": len(state.get("generators") or []),
    }


def _join_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    return {
        "torch_cpu": tensors["torch_cpu"],
        "torch_cuda": [tensors[f"torch_cuda/{i}"] for i in range(plain["cuda_devices"])],
        "generators": [tensors[f"generators/{i}"] for i in range(plain.get("generators", 0))],
        "python": plain["python"],
        "numpy": plain["numpy"],
    }


# --- optimizer state as tensors + JSON -----------------------------------------------------------------------------


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in plain["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": plain["param_groups"]}


# --- a trainer's state <-> a Checkpoint --------------------------------------------------------------------------


def snapshot(
    step: int,
    named_params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    generators: Sequence[torch.Generator],
    scaler: Any = None,
) -> Checkpoint:
    """The restorable state of a run at the end of `step`: its trained parameters by name, the optimizer, every
    RNG, the fp16 GradScaler when there is one, and `info` (JSON: losses, fingerprint, ...)."""
    if scaler is not None:
        info = {**info, "grad_scaler": scaler.state_dict()}
    return Checkpoint(
        step=step,
        weights={name: p.detach() for name, p in named_params.items()},
        optimizer=optimizer.state_dict(),
        rng=capture_rng_state(generators),
        info=info,
    )


def restore(
    ckpt: Checkpoint,
    named_params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generators: Sequence[torch.Generator],
    scaler: Any = None,
) -> None:
    """Put `ckpt` back into a freshly set-up run: parameters, optimizer state, scaler and every RNG."""
    missing = set(named_params) ^ set(ckpt.weights)
    if missing:
        raise TrainingError(
            f"{ckpt.uri}: its weights do not match this model ({len(missing)} names differ, e.g. "
            f"{sorted(missing)[0]}); resume with the same base model and mode, or use a new out folder"
        )
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(ckpt.weights[name])
    # hyperparameters come from this run's optimizer (the config was checked to agree), state from the checkpoint
    optimizer.load_state_dict(
        {"state": ckpt.optimizer["state"], "param_groups": optimizer.state_dict()["param_groups"]}
    )
    if scaler is not None and "grad_scaler" in ckpt.info:
        scaler.load_state_dict(ckpt.info["grad_scaler"])
    restore_rng_state(ckpt.rng, generators)


# --- saving and finding ------------------------------------------------------------------------------------------


def save_checkpoint(root: str, ckpt: Checkpoint) -> str:
    """Write `ckpt` under `root`; the manifest goes last, so a reader sees a complete checkpoint or none."""
    uri = storage.join(root, checkpoint_dir_name(ckpt.step))
    storage.delete_prefix(uri)  # leftovers of an interrupted write of this same step
    optimizer_tensors, optimizer_plain = _split_optimizer(ckpt.optimizer)
    rng_tensors, rng_plain = _split_rng(ckpt.rng)
    files = {
        "weights.safetensors": save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in ckpt.weights.items()}
        ),
        "optimizer.safetensors": save_safetensors(optimizer_tensors),
        "rng.safetensors": save_safetensors(rng_tensors),
        "state.json": json.dumps(
            {"optimizer": optimizer_plain, "rng": rng_plain, "info": ckpt.info}, default=_json_default
        ).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data)
    manifest = {
        "format": FORMAT_VERSION,
        "step": ckpt.step,
        "files": {name: storage.sha256_bytes(data) for name, data in files.items()},
    }
    storage.write_json(storage.join(uri, MANIFEST_NAME), manifest)
    return uri


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _step_dirs(root: str) -> dict[int, tuple[str, bool]]:
    """{step: (uri, has_manifest)} of every step-XXXXXXX folder under root."""
    found: dict[int, tuple[str, bool]] = {}
    for f in storage.list_files(root):
        parts = storage.relative(f, root).split("/")
        match = STEP_DIR.match(parts[0]) if len(parts) == 2 else None
        if match:
            step = int(match.group(1))
            _, complete = found.get(step, ("", False))
            found[step] = (storage.join(root, parts[0]), complete or parts[1] == MANIFEST_NAME)
    return found


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, uri) of every checkpoint with a manifest, oldest first."""
    return sorted((step, uri) for step, (uri, complete) in _step_dirs(root).items() if complete)


def newest_to_resume(root: str, resume: bool, fresh_hint: str) -> str | None:
    """The newest complete checkpoint under `root` (None if none). Without `resume`, finding one is an error:
    a new run never mixes with, or overwrites, an earlier run's checkpoints."""
    from dreambooth_lib.errors import TrainingError

    newest = latest_checkpoint(root)
    if newest and not resume:
        raise TrainingError(
            f"{root}: holds checkpoints of an earlier run ({newest}); pass resume=True (--resume) to continue it, "
            f"or {fresh_hint}"
        )
    return newest


def latest_checkpoint(root: str) -> str | None:
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete folders older than the newest."""
    dirs = _step_dirs(root)
    complete = sorted(step for step, (_, ok) in dirs.items() if ok)
    if not complete:
        return []
    keep_steps = set(complete[-keep:])
    newest = complete[-1]
    doomed = [
        uri for step, (uri, ok) in sorted(dirs.items()) if step not in keep_steps and (ok or step < newest)
    ]
    for uri in doomed:
        storage.delete(
            storage.join(uri, MANIFEST_NAME)
        )  # first: a half-deleted folder must read as incomplete
        storage.delete_prefix(uri)
    return doomed


def load_checkpoint(uri: str) -> Checkpoint:
    """Read a complete checkpoint, checking every file against its manifest."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        raise TrainingError(
            f"{uri}: no {MANIFEST_NAME}; the checkpoint is incomplete, resume from another one"
        )
    manifest = storage.read_json(manifest_uri)
    if manifest.get("format") != FORMAT_VERSION:
        raise TrainingError(
            f"{manifest_uri}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}"
        )
    data = {}
    for name, digest in manifest["files"].items():
        data[name] = storage.read_bytes(storage.join(uri, name))
        if storage.sha256_bytes(data[name]) != digest:
            raise TrainingError(
                f"{storage.join(uri, name)}: content does not match the manifest (corrupt checkpoint)"
            )
    plain = json.loads(data["state.json"])
    return Checkpoint(
        step=int(manifest["step"]),
        weights=load_safetensors(data["weights.safetensors"]),
        optimizer=_join_optimizer(load_safetensors(data["optimizer.safetensors"]), plain["optimizer"]),
        rng=_join_rng(load_safetensors(data["rng.safetensors"]), plain["rng"]),
        info=plain["info"],
        uri=uri,
    )
