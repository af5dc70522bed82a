"""Fuzzed task IDs in the path of /v1/tasks/{id} and /v1/tasks/{id}/events, against one real
relay for the module (tests/fuzzing.py): a bad ID gets a JSON 4xx and never reaches the
upstream."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import example, given

from .clients import read_stream
from .fuzzing import (
    FUZZ,
    Stage,
    assert_healthy_and_idle,
    assert_json_error,
    is_valid_task_id,
    staged,
    task_id_texts,
)


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    with staged() as stage:
        yield stage


def path_segment(task_id: str) -> str:
    """Percent-encode everything, dots too, so no client or server reads the ID as a path.

    A lone surrogate goes out as the bytes it would have in UTF-16-minded clients
    (invalid UTF-8), which the relay must refuse like any other bad ID.
    """
    return quote(task_id, safe="", errors="surrogatepass").replace(".", "%2E")


@FUZZ
@given(task_id=task_id_texts)
@example(task_id="")
@example(task_id="a/b")
@example(task_id="a/events")
@example(task_id=".")
@example(task_id="..")
@example(task_id="x" * 128)
@example(task_id="x" * 129)
@example(task_id="é")
@example(task_id="\n")
@example(task_id="a\nb")
@example(task_id="\ud800")
def test_invalid_task_ids_get_a_json_4xx_and_never_reach_the_upstream(
    stage: Stage, task_id: str
) -> None:
    base = f"{stage.relay.url}/v1/tasks/{path_segment(task_id)}"
    for url in (base, base + "/events"):
        calls_before = stage.standin.total
        answer = read_stream(stage.http, url)
        if is_valid_task_id(task_id):
            # A well-formed but unknown ID: one upstream lookup, then task_not_found.
            if answer.status == 200 and answer.events:
                assert answer.events[0].event == "error", answer
                assert answer.events[0].data["code"] == "task_not_found", answer
            else:
                assert_json_error(answer, {"task_not_found"})
            continue
        assert_json_error(answer, {"invalid_task_id"})
        assert answer.body["code"] == "invalid_task_id", answer
        assert stage.standin.calls[task_id] == 0
        assert stage.standin.total == calls_before, f"{task_id!r} reached the upstream"
    assert all(is_valid_task_id(name) for name in stage.standin.calls), "an invalid ID was polled"


def test_the_relay_is_healthy_and_idle_after_the_fuzzing(stage: Stage) -> None:
    assert_healthy_and_idle(stage)
