"""Choose the subject's rare-token identifier [V]: a thin adapter over dreambooth_lib.identifier."""

from typing import NamedTuple

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def choose_identifier(
    base_model: str,
    class_noun: str,
    registry_uri: str = "",
    identifier_options: dict = {},  # noqa: B006 - KFP reads the literal default into the spec
    allow_pickle: bool = False,
) -> NamedTuple("IdentifierOutputs", identifier=str, token_id=int, prompt=str):
    """A rare token of the base model's tokenizer, unused in the registry (run uncached: the registry changes).

    `identifier_options` holds IdentifierConfig fields; `{"identifier": "xyz"}` fixes it (still validated).
    """
    from dreambooth_lib import identifier
    from dreambooth_lib.config import IdentifierConfig, parse_config

    config = parse_config(IdentifierConfig, identifier_options, "identifier_options")
    result = identifier.run(
        base_model, class_noun, config, registry_uri=registry_uri or None, allow_pickle=allow_pickle
    )
    print(f"identifier {result.identifier!r} (token {result.token_id}) from {result.candidates} candidates")
    return (result.identifier, result.token_id, result.prompt)
