"""The model registry: immutable versions with their model card, lineage and report; pluggable backends."""

from dreambooth_lib.registry.store import (
    FileRegistryBackend,
    RegisteredModel,
    Registry,
    RegistryBackend,
    open_registry,
    register_backend,
    register_from_dirs,
    render_model_card,
)
