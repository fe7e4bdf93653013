"""trees.flatten / numbers: the one flattener of configs, results and records."""

import ml_collections

from hcsc_jax import trees


def test_flatten_keeps_order_and_lists_unless_asked():
    tree = {"b": {"z": 1, "a": [2, 3]}, "a": "x"}
    assert list(trees.flatten(tree).items()) == [("b.z", 1), ("b.a", [2, 3]), ("a", "x")]
    assert trees.flatten(tree, "/", lists=True) == {"b/z": 1, "b/a/0": 2, "b/a/1": 3, "a": "x"}
    config = ml_collections.ConfigDict({"model": {"arch": "resnet18", "width": 0.25}, "lr": 0.1})
    assert trees.flatten(config) == {"model.arch": "resnet18", "model.width": 0.25, "lr": 0.1}
    assert trees.flatten({"empty": {}}) == {}


def test_numbers_are_the_numeric_leaves_without_bools_strings_or_lists():
    result = {"per_k": {"20": {"top1": 91.5}}, "best_k": 20, "done": True, "name": "knn", "ks": [20]}
    assert trees.numbers(result, "knn") == {"knn/per_k/20/top1": 91.5, "knn/best_k": 20.0}
    assert trees.numbers({"nmi": [0.5, 0.25]}, "eval", lists=True) == {"eval/nmi/0": 0.5, "eval/nmi/1": 0.25}
