"""Nested dicts (results, records, configs) as flat {"a.b": leaf} dicts: the one flattener that
config checks, resume, metrics and the trainer's evaluation records share."""

from __future__ import annotations

from typing import Any


def flatten(tree, sep: str = ".", lists: bool = False) -> dict[str, Any]:
    """{"a": {"b": 1, "c": [2, 3]}} -> {"a.b": 1, "a.c": [2, 3]} (with `lists`: {"a.b": 1,
    "a.c.0": 2, "a.c.1": 3}), leaves in the tree's order. Anything with `.items()` is a node
    (dicts, ml_collections.ConfigDict)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if hasattr(node, "items"):
            for key, value in node.items():
                walk(value, f"{prefix}{key}{sep}")
        elif lists and isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}{sep}")
        else:
            out[prefix[:-len(sep)]] = node

    walk(tree, "")
    return out


def numbers(tree, prefix: str, sep: str = "/", lists: bool = False) -> dict[str, float]:
    """The numeric leaves of `tree` (bools, strings and, unless `lists`, lists left out) as
    {prefix + sep + flattened key: float}."""
    return {f"{prefix}{sep}{key}": float(v) for key, v in flatten(tree, sep, lists).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
