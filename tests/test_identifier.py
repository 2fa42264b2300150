"""The rare-token identifier search on the real CLIP vocabulary."""

import pytest

from dreambooth_lib import identifier
from dreambooth_lib.config import IdentifierConfig
from dreambooth_lib.errors import ConfigError, DreamboothError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return identifier.load_tokenizer(tiny_model)


def test_deterministic_in_seed_and_varies_across_seeds(tokenizer):
    a = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=0))
    b = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=0))
    picks = {
        identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=s)).identifier for s in range(8)
    }
    assert a == b
    assert len(picks) > 4


def test_chosen_identifier_is_one_rare_token_inside_the_prompt(tokenizer):
    for seed in range(5):
        r = identifier.choose_identifier(tokenizer, "teddy bear", IdentifierConfig(seed=seed))
        ids = tokenizer(r.prompt).input_ids
        assert ids.count(r.token_id) == 1
        assert len(ids) == len(tokenizer("a teddy bear").input_ids) + 1
        assert 1 <= len(r.identifier) <= 3 and r.identifier.isalpha()
        assert 40000 <= r.token_id < 49408
        assert tokenizer.decode([r.token_id]).strip() == r.identifier


def test_pool_size_on_the_real_vocabulary(tokenizer):
    pool = identifier.candidate_pool(tokenizer, "dog", IdentifierConfig())
    assert len(pool) == 627  # letters-only, <= 3 characters, ids >= 40000, one token inside "a [V] dog"
    r = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig())
    assert r.candidates + len(r.excluded) == 627


def test_blocklist_excludes_sks_and_common_words(tokenizer):
    pool = {t for _, t in identifier.candidate_pool(tokenizer, "dog", IdentifierConfig())}
    assert "sks" in pool  # it is a rare token...
    r = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig())
    assert set(r.excluded) == pool & identifier.builtin_blocklist()  # ...but never drawn: "sks" is a rifle
    assert "sks" in r.excluded
    picks = {
        identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=s)).identifier for s in range(30)
    }
    assert not picks & identifier.builtin_blocklist()
    wide = IdentifierConfig(min_token_id=300, max_token_id=2000)
    wide_pool = {t for _, t in identifier.candidate_pool(tokenizer, "dog", wide)}
    common = {"the", "and", "dog", "red", "man"}
    assert common <= wide_pool  # a wide range reaches common words...
    assert common <= set(
        identifier.choose_identifier(tokenizer, "dog", wide).excluded
    )  # ...which are excluded


def test_explicit_exclusions_and_user_blocklist(tokenizer):
    first = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=0)).identifier
    r = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=0), exclude=[first])
    assert r.identifier != first and first in r.excluded
    r2 = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=0, blocklist=[first.upper()]))
    assert r2.identifier != first


def test_registry_identifiers_are_excluded(tokenizer, tiny_model, monkeypatch):
    first = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(seed=0)).identifier
    monkeypatch.setattr(identifier, "registry_identifiers", lambda uri, model, allow_pickle=False: {first})
    r = identifier.run(tiny_model, "dog", IdentifierConfig(seed=0), registry_uri="reg")
    assert r.identifier != first and first in r.excluded


def test_forced_identifier_is_validated(tokenizer):
    r = identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(identifier="muh"))
    assert r.identifier == "muh" and r.chosen_by == "config"
    with pytest.raises(ConfigError, match="blocklisted"):
        identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(identifier="sks"))
    with pytest.raises(ConfigError, match="not one token"):
        identifier.choose_identifier(tokenizer, "dog", IdentifierConfig(identifier="zqxjv"))


def test_empty_range_is_a_clear_error(tokenizer):
    with pytest.raises(DreamboothError, match="no identifier left"):
        identifier.choose_identifier(
            tokenizer, "dog", IdentifierConfig(min_token_id=49400, max_token_id=49405)
        )
