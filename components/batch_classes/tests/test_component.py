"""list_classes: one item per class, carrying what the prior step needs."""

from components.batch_classes.component import list_classes


def test_one_item_per_class():
    common = {"base_model_digest": "d", "prior_root": "gs://b/priors"}
    planned = {"images": "gs://b/x", "identifier": "zwx", "live": False, **common}
    subjects = [
        {"name": n, "class_noun": c, **planned} for n, c in [("a", "dog"), ("b", "cat"), ("c", "dog")]
    ]
    assert list_classes.python_func(subjects=subjects) == [
        {"class_noun": "cat", **common},
        {"class_noun": "dog", **common},
    ]
