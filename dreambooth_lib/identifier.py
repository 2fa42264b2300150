"""The paper's rare-token identifier search, on the base model's own tokenizer.

DreamBooth binds the subject to a unique identifier [V] with a weak prior: a rare token of the model's own
vocabulary, short (<= 3 characters) so the tokenizer keeps it as one token, never a common word. The paper drew
from T5-XXL ids 5000-10000; on CLIP's BPE vocabulary (Stable Diffusion) that range holds common words ("roy",
"eva", "pan"). CLIP lists its merges in the order they were learnt, most frequent first, so the last-learnt
merges — ids >= 40000 of 49408 — are the rarest strings of its training corpus: the default range. On the real
vocabulary it holds 627 letters-only strings of <= 3 characters that stay one token inside "a [V] dog".

Families with a T5 encoder as well (SD3, FLUX.1) read the prompt through both: the identifier is chosen from CLIP's
vocabulary as above and must also be rare for T5, i.e. no word of its SentencePiece vocabulary (one whole-word
piece would carry that word's prior) but a short sequence of pieces (`MAX_T5_PIECES`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import BaseModel

from dreambooth_lib.config import IdentifierConfig
from dreambooth_lib.errors import ConfigError, DreamboothError

WORD_END = "</w>"
WORD_START = "▁"  # SentencePiece's mark of a piece that starts a word
MAX_T5_PIECES = 4


class IdentifierResult(BaseModel):
    identifier: str
    token_id: int
    class_noun: str
    prompt: str
    candidates: int
    range: tuple[int, int]
    seed: int
    excluded: list[str]
    chosen_by: str  # "search" or "config"
    vocab_size: int
    also_rare_in: list[str] = []  # the model's other (SentencePiece) tokenizers the identifier was checked in


@lru_cache(maxsize=1)
def builtin_blocklist() -> frozenset[str]:
    """Known strong-prior strings (assets/identifier_blocklist.txt): 'sks' (a rifle), abbreviations, common words."""
    text = resources.files("dreambooth_lib").joinpath("assets/identifier_blocklist.txt").read_text()
    words: set[str] = set()
    for line in text.splitlines():
        words.update(line.split("#", 1)[0].lower().split())
    return frozenset(words)


def load_tokenizer(model: str, allow_pickle: bool = False):
    """The (first) CLIP tokenizer of a diffusers model folder / gs:// prefix / hub id, or a tokenizer folder."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from dreambooth_lib.models import is_lora_dir, lora_base_model, resolve_model_dir

    local = resolve_model_dir(model, allow_pickle=allow_pickle)
    if is_lora_dir(local):
        local = resolve_model_dir(lora_base_model(local, model), allow_pickle=allow_pickle)
    folder = local / "tokenizer" if (local / "tokenizer").is_dir() else local
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise DreamboothError(f"{model}: no tokenizer found in {Path(folder).name}/ ({err})") from None


def piece_tokenizers(model: str, allow_pickle: bool = False) -> dict[str, object]:
    """The model's SentencePiece tokenizers (T5's: tokenizer_2 of FLUX.1, tokenizer_3 of SD3) by folder name; {}
    for a CLIP-only model (SD, SDXL) or a bare tokenizer folder."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from dreambooth_lib.models import is_lora_dir, lora_base_model, resolve_model_dir

    local = resolve_model_dir(model, allow_pickle=allow_pickle)
    if is_lora_dir(local):
        local = resolve_model_dir(lora_base_model(local, model), allow_pickle=allow_pickle)
    found = {}
    for folder in sorted(local.glob("tokenizer_*")):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if not isinstance(tokenizer, CLIPTokenizer):
            found[folder.name] = tokenizer
    return found


def is_rare_in_pieces(tokenizer, candidate: str) -> bool:
    """True when a SentencePiece tokenizer reads `candidate` as a few pieces, none of them the whole word."""
    pieces = tokenizer.tokenize(candidate)
    unknown = tokenizer.unk_token in pieces
    return not unknown and pieces != [WORD_START + candidate] and 1 <= len(pieces) <= MAX_T5_PIECES


def _is_single_token(tokenizer, candidate: str, class_noun: str, token_id: int) -> bool:
    """True when the candidate is exactly one token, `token_id`, inside 'a [V] [class]'."""
    with_v = tokenizer(f"a {candidate} {class_noun}", add_special_tokens=False).input_ids
    without = tokenizer(f"a {class_noun}", add_special_tokens=False).input_ids
    return len(with_v) == len(without) + 1 and with_v[1] == token_id and with_v[:1] + with_v[2:] == without


def candidate_pool(tokenizer, class_noun: str, config: IdentifierConfig) -> list[tuple[int, str]]:
    """(token id, string) of every identifier allowed by the config, before exclusions, sorted by id."""
    specials = set(tokenizer.all_special_ids)
    hi = _upper_token_id(tokenizer, config)
    lo = config.min_token_id
    if lo >= hi:
        raise ConfigError(f"identifier.min_token_id ({lo}) must be below max_token_id ({hi})")
    ids = [i for i in range(lo, hi) if i not in specials]
    pool = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if not token or not token.endswith(WORD_END):
            continue  # a word piece, not a whole word: it would merge with its neighbours
        text = token[: -len(WORD_END)]
        if (
            not (1 <= len(text) <= config.max_chars)
            or not text.isascii()
            or not text.isprintable()
            or " " in text
        ):
            continue
        if config.letters_only and not text.isalpha():
            continue
        if text != text.lower():
            continue
        pool.append((token_id, text))
    return [(i, t) for i, t in pool if _is_single_token(tokenizer, t, class_noun, i)]


def registry_identifiers(registry_uri: str | None, base_model: str, allow_pickle: bool = False) -> set[str]:
    """Identifiers already registered for this base model (unique per base model)."""
    if not registry_uri:
        return set()
    from dreambooth_lib.models import model_digest
    from dreambooth_lib.registry import open_registry

    return set(
        open_registry(registry_uri).used_identifiers(model_digest(base_model, allow_pickle=allow_pickle))
    )


def choose_identifier(
    tokenizer,
    class_noun: str,
    config: IdentifierConfig,
    exclude: Iterable[str] = (),
    also_rare_in: dict[str, object] | None = None,
) -> IdentifierResult:
    """Draw an identifier uniformly (seeded) from the rare range, skipping blocked and excluded strings and those
    the model's other tokenizers (`also_rare_in`, by name: T5's) read as a word."""
    also_rare_in = also_rare_in or {}
    blocked = builtin_blocklist() | {w.lower() for w in config.blocklist}
    excluded = {e.lower() for e in exclude}
    hi = _upper_token_id(tokenizer, config)
    if config.identifier is not None:
        v = config.identifier.strip().lower()
        ids = tokenizer(f"a {v} {class_noun}", add_special_tokens=False).input_ids
        token_id = ids[1] if len(ids) > 1 else -1
        if not _is_single_token(tokenizer, v, class_noun, token_id):
            raise ConfigError(
                f"identifier.identifier {config.identifier!r} is not one token inside 'a {v} {class_noun}'; "
                "leave it unset to search the vocabulary, or pick a string the tokenizer keeps whole"
            )
        common = [name for name, other in also_rare_in.items() if not is_rare_in_pieces(other, v)]
        if common:
            raise ConfigError(
                f"identifier.identifier {config.identifier!r} is a word (or not a short piece sequence) for the "
                f"model's {', '.join(common)}; choose another or unset it"
            )
        if v in blocked or v in excluded:
            why = (
                "blocklisted (a strong prior)"
                if v in blocked
                else "already taken (by a registered model or an earlier subject of this batch)"
            )
            raise ConfigError(
                f"identifier.identifier {config.identifier!r} is {why}; choose another or unset it"
            )
        return _result(
            tokenizer, config, class_noun, v, token_id, candidates=1, excluded=[], chosen_by="config",
            also_rare_in=sorted(also_rare_in),
        )  # fmt: skip
    pool = [
        (i, t) for i, t in candidate_pool(tokenizer, class_noun, config)
        if all(is_rare_in_pieces(other, t) for other in also_rare_in.values())
    ]  # fmt: skip
    skipped = sorted({t for _, t in pool if t in blocked or t in excluded})
    allowed = [(i, t) for i, t in pool if t not in blocked and t not in excluded]
    if not allowed:
        raise DreamboothError(
            f"no identifier left in token ids [{config.min_token_id}, {hi}) for class {class_noun!r} "
            f"({len(pool)} candidates, {len(skipped)} excluded); widen identifier.min_token_id/max_token_id "
            "or set identifier.letters_only=false"
        )
    token_id, text = random.Random(config.seed).choice(allowed)
    return _result(
        tokenizer,
        config,
        class_noun,
        text,
        token_id,
        candidates=len(allowed),
        excluded=skipped,
        chosen_by="search",
        also_rare_in=sorted(also_rare_in),
    )


def _result(tokenizer, config: IdentifierConfig, class_noun: str, identifier: str, token_id: int, *,
            candidates: int, excluded: list[str], chosen_by: str, also_rare_in: list[str]) -> IdentifierResult:  # fmt: skip
    return IdentifierResult(
        identifier=identifier,
        token_id=token_id,
        class_noun=class_noun,
        prompt=f"a {identifier} {class_noun}",
        candidates=candidates,
        range=(config.min_token_id, _upper_token_id(tokenizer, config)),
        seed=config.seed,
        excluded=excluded,
        chosen_by=chosen_by,
        vocab_size=len(tokenizer),
        also_rare_in=also_rare_in,
    )


def _upper_token_id(tokenizer, config: IdentifierConfig) -> int:
    """The exclusive end of the identifier range: max_token_id, else the end of the regular vocabulary."""
    return config.max_token_id if config.max_token_id is not None else len(tokenizer)


def run(
    model: str,
    class_noun: str,
    config: IdentifierConfig,
    exclude: Iterable[str] = (),
    registry_uri: str | None = None,
    allow_pickle: bool = False,
) -> IdentifierResult:
    """Choose the identifier for a subject of `class_noun` on base model `model`."""
    tokenizer = load_tokenizer(model, allow_pickle=allow_pickle)
    used = registry_identifiers(registry_uri, model, allow_pickle=allow_pickle)
    others = piece_tokenizers(model, allow_pickle=allow_pickle)
    return choose_identifier(tokenizer, class_noun, config, exclude=set(exclude) | used, also_rare_in=others)
