from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from relay.patch import apply_patch, drop_nulls, merge_patch

from .rfc7396 import EXAMPLES as RFC7396

scalars = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=4), json_values, max_size=6)


def test_unchanged_state_gives_an_empty_patch() -> None:
    state = {"status": "running", "state": {"step": 3}}
    assert merge_patch(state, dict(state)) == {}


def test_patch_holds_only_changed_fields() -> None:
    old = {"status": "running", "progress": 0.1, "message": "Executing node KSampler"}
    new = {"status": "running", "progress": 0.2, "message": "Executing node KSampler"}
    assert merge_patch(old, new) == {"progress": 0.2}


def test_nested_objects_are_patched_member_by_member() -> None:
    old = {"state": {"step": 1, "maxSteps": 20, "nodeLabel": "KSampler"}}
    new = {"state": {"step": 2, "maxSteps": 20, "nodeLabel": "KSampler"}}
    assert merge_patch(old, new) == {"state": {"step": 2}}


def test_removed_field_is_null() -> None:
    old = {"status": "waiting", "lastQueueRemaining": 2}
    new = {"status": "running"}
    assert merge_patch(old, new) == {"status": "running", "lastQueueRemaining": None}


def test_object_replaced_by_scalar_and_back() -> None:
    assert merge_patch({"a": {"b": 1}}, {"a": 2}) == {"a": 2}
    assert merge_patch({"a": 2}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_int_and_float_of_one_value_are_one_json_number() -> None:
    assert merge_patch({"progress": 0}, {"progress": 0.0}) == {}


def test_boolean_replacing_a_number_is_a_change() -> None:
    assert merge_patch({"flag": 1}, {"flag": True}) == {"flag": True}
    assert merge_patch({"flag": False}, {"flag": 0}) == {"flag": 0}


def test_boolean_replacing_a_number_inside_an_array_or_object_is_a_change() -> None:
    assert merge_patch({"a": [1]}, {"a": [True]}) == {"a": [True]}
    assert merge_patch({"a": [{"b": 0}]}, {"a": [{"b": False}]}) == {"a": [{"b": False}]}
    assert merge_patch({"a": [1, 2]}, {"a": [1.0, 2.0]}) == {}


def test_arrays_are_replaced_whole() -> None:
    assert merge_patch({"images": ["a", "b"]}, {"images": ["a"]}) == {"images": ["a"]}


def test_apply_follows_rfc7396_examples() -> None:
    for target, patch, expected in RFC7396:
        assert apply_patch(target, patch) == expected


def test_apply_does_not_change_its_arguments() -> None:
    target = {"a": {"b": 1}}
    patch = {"a": {"b": 2}}
    apply_patch(target, patch)
    assert target == {"a": {"b": 1}} and patch == {"a": {"b": 2}}


def test_drop_nulls_removes_null_members_but_keeps_arrays() -> None:
    data = {"a": None, "b": {"c": None, "d": 1}, "e": [None, {"f": None}]}
    assert drop_nulls(data) == {"b": {"d": 1}, "e": [None, {"f": None}]}


def as_json(value: Any) -> Any:
    """A form in which Python's `==` compares as JSON does: true is not 1, 1 is 1.0."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, list):
        return ("array", tuple(as_json(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, as_json(item)) for key, item in value.items()))
    return ("string", value)


@given(json_objects, json_objects)
def test_apply_of_diff_gives_the_new_state(old: dict[str, Any], new: dict[str, Any]) -> None:
    old, new = drop_nulls(old), drop_nulls(new)
    assert as_json(apply_patch(old, merge_patch(old, new))) == as_json(new)


@given(json_objects)
def test_diff_of_equal_states_is_empty(state: dict[str, Any]) -> None:
    assert merge_patch(state, state) == {}
