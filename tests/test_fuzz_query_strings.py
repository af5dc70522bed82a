"""Fuzzed query strings on the multiplexed stream /v1/events, against one real relay for the
module (tests/fuzzing.py): any query gets a stream of well-formed events or one JSON 4xx,
never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from .clients import read_stream
from .fuzzing import (
    FUZZ,
    Stage,
    assert_healthy_and_idle,
    assert_json_error,
    staged,
    task_id_texts,
    valid_task_ids,
)

pytestmark = pytest.mark.slow  # 7 s: 150 query strings, some with thousands of parameters


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    with staged() as stage:
        yield stage


param_names = st.sampled_from(["taskId", "taskId", "taskId", "taskid", "task_id", "taskId[]", ""])
param_pairs = st.lists(st.tuples(param_names | st.text(max_size=10), task_id_texts), max_size=40)
raw_queries = st.lists(
    st.sampled_from([*"taskId=&%;+?/:,0123456789abcdefABCDEF-_. ", "%FF", "%2", "é"]), max_size=300
).map("".join)


def encode_pairs(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{url_part(k)}={url_part(v)}" for k, v in pairs)


def url_part(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")


queries = st.one_of(
    param_pairs.map(encode_pairs),
    st.tuples(task_id_texts, st.integers(1, 3000)).map(
        lambda t: "&".join([f"taskId={url_part(t[0])}"] * t[1])
    ),
    st.lists(valid_task_ids, min_size=30, max_size=40).map(
        lambda ids: encode_pairs([("taskId", i) for i in ids])
    ),
    raw_queries,
).map(lambda query: query[:60_000])  # httpx refuses URLs over 64 KiB


@FUZZ
@given(query=queries)
@example(query="")
@example(query="taskId=")
@example(query="taskId=&taskId=")
@example(query="&&&===")
def test_any_query_string_on_the_multiplexed_stream_is_answered_without_a_500(
    stage: Stage, query: str
) -> None:
    answer = read_stream(stage.http, f"{stage.relay.url}/v1/events?{query}", max_events=50)
    assert answer.status < 500, answer
    if answer.status == 200:
        assert answer.content_type.startswith("text/event-stream"), answer
        for event in answer.events:
            kind, data = event.event, event.data
            assert kind in ("error", "snapshot", "patch", "end"), answer
            assert isinstance(data, dict) and set(data) == {"taskId", "data"}, answer
            if kind == "error":
                assert data["data"]["code"] in ("invalid_task_id", "task_not_found"), answer
    else:
        # No task of the list can be watched: one HTTP error, so EventSource stops.
        assert_json_error(
            answer, {"bad_request", "too_many_tasks", "invalid_task_id", "task_not_found"}
        )


def test_the_relay_is_healthy_and_idle_after_the_fuzzing(stage: Stage) -> None:
    assert_healthy_and_idle(stage)
