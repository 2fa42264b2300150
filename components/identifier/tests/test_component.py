"""choose_identifier: a one-token rare string of the model's tokenizer; options and the registry are honoured."""

from components.identifier.component import choose_identifier


def test_chooses_a_one_token_identifier(tiny_model_dir):
    identifier, token_id, prompt = choose_identifier.python_func(base_model=tiny_model_dir, class_noun="dog")
    assert prompt == f"a {identifier} dog" and token_id >= 40000 and 1 <= len(identifier) <= 3
    other, _, _ = choose_identifier.python_func(
        base_model=tiny_model_dir, class_noun="dog", identifier_options={"blocklist": [identifier]}
    )
    assert other != identifier


def test_local_run(local_kfp, tiny_model_dir):
    task = choose_identifier(base_model=tiny_model_dir, class_noun="dog")
    assert (
        task.outputs["identifier"]
        == choose_identifier.python_func(base_model=tiny_model_dir, class_noun="dog")[0]
    )
