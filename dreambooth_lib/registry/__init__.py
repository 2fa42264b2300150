"""The model registry: immutable versions with their model card, lineage and report; pluggable backends.

layout (the files of a version), entries (an index entry, its status and lease), backends (the bookkeeping and
open_registry), store (the Registry: claim, write, publish), lineage, model_folder (LoRA or full, and the
diffusers class that loads it), card (model_card.md), from_run (register a finished run's folders).
"""

from dreambooth_lib.registry.backends import (
    FileRegistryBackend,
    RegistryBackend,
    open_registry,
    register_backend,
)
from dreambooth_lib.registry.card import render_model_card
from dreambooth_lib.registry.entries import RegisteredModel
from dreambooth_lib.registry.from_run import register_from_dirs
from dreambooth_lib.registry.store import Registry

__all__ = [
    "FileRegistryBackend",
    "RegisteredModel",
    "Registry",
    "RegistryBackend",
    "open_registry",
    "register_backend",
    "register_from_dirs",
    "render_model_card",
]
