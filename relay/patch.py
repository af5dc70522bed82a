"""JSON Merge Patch (RFC 7396): the diff the relay pushes, and how a client applies it."""

from __future__ import annotations

from typing import Any

JSONObject = dict[str, Any]


def merge_patch(old: JSONObject, new: JSONObject) -> JSONObject:
    """Return the merge patch that turns `old` into `new`.

    Nested objects are patched member by member; a member that disappeared is
    `null`. Merge patches cannot carry a `null` value, so states hold none (the
    relay drops them when it reads the upstream).
    """
    patch: JSONObject = {}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
            continue
        before = old[key]
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif not same_json(before, value):
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, at any depth: 1 and 1.0 are one number, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    if isinstance(a, (list, dict)) or isinstance(b, (list, dict)):
        return False
    return bool(a == b)


def apply_patch(target: Any, patch: Any) -> Any:
    """Apply a merge patch to `target` and return the result; neither argument is changed."""
    if not isinstance(patch, dict):
        return patch
    result: JSONObject = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_patch(result.get(key), value)
    return result


def drop_nulls(value: Any) -> Any:
    """Remove `null` members from objects, recursively.

    Arrays are kept as they are: a merge patch replaces an array whole, so a
    `null` inside one survives the round trip.
    """
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    return value
