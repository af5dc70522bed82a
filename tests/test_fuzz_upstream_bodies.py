"""Fuzzed upstream bodies: through one real relay for the module (tests/fuzzing.py), where bad
bodies are retried and SSE and WebSocket subscribers still get the final state in JSON a
browser can parse; and into read_envelope, as a pure function."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.upstream import UpstreamError, read_envelope

from .clients import Watcher, watch_sse, watch_ws
from .fuzzing import (
    FUZZ,
    SANE_RESULT,
    Reply,
    Stage,
    assert_healthy_and_idle,
    json_scalars,
    json_values,
    sane_state,
    staged,
    valid_task_ids,
)


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    with staged() as stage:
        yield stage


def is_terminal_or_final(body: Any) -> bool:
    """Bodies that would legitimately end the task early; the body test keeps to the others."""
    if not isinstance(body, dict):
        return False
    if body.get("subErrCode") == "B_COMPUTING_CanNotFindTask":
        return True
    data = body.get("data")
    return (
        body.get("status") == 10
        and isinstance(data, dict)
        and data.get("status") in ("succeeded", "failed")
    )


state_data = st.dictionaries(st.text(max_size=10), json_values, max_size=6).flatmap(
    lambda extra: st.fixed_dictionaries(
        {"status": st.sampled_from(["waiting", "running"]) | json_values},
        optional={"progress": json_values, "lastQueueRemaining": json_values, "state": json_values},
    ).map(lambda core: {**extra, **core})
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "status": st.just(10) | st.just(20) | json_values,
        "data": state_data | json_values,
        "subErrCode": st.none() | st.text(max_size=30),
        "errCode": json_values,
        "apiInvokeId": json_values,
    },
).filter(lambda body: not is_terminal_or_final(body))
upstream_bodies = st.one_of(
    envelopes.map(lambda body: json.dumps(body).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=500),
    st.text(max_size=200).map(lambda text: text.encode("utf-8")),
    st.integers(1, 3 << 19).map(
        lambda n: b'{"status":10,"data":{"status":"running","blob":"' + b"y" * n + b'"}}'
    ),
    st.just(b"\xff\xfe{\x00"),
    st.just(b'{"status":10,"data":{"status":"running","x":"\xff\xfe"}}'),
)
replies = st.builds(
    Reply,
    body=upstream_bodies,
    status=st.sampled_from([200, 200, 200, 200, 404, 500, 502, 503]),
    media_type=st.sampled_from(["application/json", "text/html", "application/octet-stream"]),
)


async def follow_sse(base: str, task_id: str) -> Watcher:
    # strict: the stream is read as a browser reads it, patches merged without relay.patch.
    async with httpx.AsyncClient(timeout=10) as client:
        return await watch_sse(client, base, task_id, strict=True)


async def follow_both(stage: Stage, task_id: str) -> list[Watcher]:
    return list(
        await asyncio.wait_for(
            asyncio.gather(
                follow_sse(stage.relay.url, task_id),
                watch_ws(stage.relay.ws_url, task_id, strict=True, timeout=10),
            ),
            20,
        )
    )


def assert_recovered(stage: Stage, task_id: str, seen: list[Watcher]) -> None:
    # The relay makes the result's relative image URLs absolute against the upstream.
    images = [f"{stage.upstream_url}{image}" for image in SANE_RESULT["images"]]
    expected = {**sane_state(task_id), "result": {**SANE_RESULT, "images": images}}
    for subscriber in seen:
        for error in subscriber.errors:
            assert error["code"] == "upstream_unavailable" and error["retrying"] is True, error
        assert subscriber.ended == "succeeded", subscriber
        assert subscriber.state == expected, subscriber


@pytest.mark.slow  # 13 s: 40 tasks, each followed over SSE and WebSocket
@settings(FUZZ, max_examples=40)
@given(script=st.lists(replies, min_size=1, max_size=3))
@example(script=[Reply(b"", 200), Reply(b"null"), Reply(b"<html>", 502, "text/html")])
@example(
    script=[Reply(b'{"status":10,"data":{"status":"running","blob":"' + b"y" * (2 << 20) + b'"}}')]
)
def test_bad_upstream_bodies_are_retried_and_the_final_state_arrives(
    stage: Stage, script: list[Reply]
) -> None:
    task_id = stage.fresh_task_id()
    stage.standin.script(task_id, script)
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))
    assert stage.standin.calls[task_id] >= len(script) + 1


@pytest.mark.slow  # 5 s: 10 tasks, each followed over SSE and WebSocket
@settings(FUZZ, max_examples=10)
@given(
    value=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]),
    where=st.sampled_from(["progress", "etaRelative", "state"]),
)
def test_upstream_nan_or_infinity_never_reaches_subscribers_as_invalid_json(
    stage: Stage, value: str, where: str
) -> None:
    task_id = stage.fresh_task_id()
    inner = f'{{"step":{value}}}' if where == "state" else value
    body = f'{{"status":10,"data":{{"taskId":"{task_id}","status":"running","{where}":{inner}}}}}'
    stage.standin.script(task_id, [Reply(body.encode())] * 3)
    # strict_json fails the test on any frame a browser's JSON.parse would reject.
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))


@settings(FUZZ, max_examples=5)
@given(text=st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3))
def test_upstream_lone_surrogates_do_not_break_the_streams(stage: Stage, text: str) -> None:
    task_id = stage.fresh_task_id()
    message = json.dumps(text)  # "\\ud800": valid JSON text, not encodable as UTF-8
    body = f'{{"status":10,"data":{{"status":"running","message":{message}}}}}'
    stage.standin.script(task_id, [Reply(body.encode())])
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))


@pytest.mark.slow  # 2-3 s: 12 bodies nested up to 200,000 deep, parsed and refused
@settings(FUZZ, max_examples=12)
@given(depth=st.integers(300, 200_000), kind=st.sampled_from(["object", "array"]))
@example(depth=600, kind="object")
@example(depth=100_000, kind="array")
def test_deeply_nested_upstream_bodies_are_retried_not_fatal(
    stage: Stage, depth: int, kind: str
) -> None:
    task_id = stage.fresh_task_id()
    nested = '{"a":' * depth + "1" + "}" * depth if kind == "object" else "[" * depth + "]" * depth
    body = f'{{"status":10,"data":{{"status":"running","deep":{nested}}}}}'
    stage.standin.script(task_id, [Reply(body.encode())])
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))


def test_the_relay_is_healthy_and_idle_after_the_fuzzing(stage: Stage) -> None:
    assert_healthy_and_idle(stage)


# -- read_envelope, as a pure function ------------------------------------------------------------


def nest(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


envelope_inputs = st.one_of(
    json_values,
    envelopes,
    st.fixed_dictionaries({"status": st.just(10), "data": state_data}),
)


@pytest.mark.slow  # 2-4 s of CPU: 200 envelopes, some nested 1,500 deep
@settings(FUZZ, max_examples=200, report_multiple_bugs=False)
@given(
    body=envelope_inputs,
    deep=st.none() | st.tuples(st.integers(1, 1500), json_scalars),
    task_id=valid_task_ids,
)
@example(body={}, deep=(600, 1), task_id="t")
def test_read_envelope_returns_a_dict_or_raises_an_upstream_error(
    body: Any, deep: tuple[int, Any] | None, task_id: str
) -> None:
    """`deep` replaces the body with a valid envelope whose data nests `deep[0]` objects deep
    (built here, so that hypothesis never has to print it)."""
    if deep is not None:
        body = {"status": 10, "data": {"status": "running", "deep": nest(*deep)}}
    try:
        data = read_envelope(body, task_id)
    except UpstreamError:
        return
    assert isinstance(data, dict)
    assert None not in data.values()
