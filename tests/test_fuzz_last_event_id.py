"""Fuzzed `Last-Event-ID` headers on single-task and many-task SSE streams, against one real
relay for the module (tests/fuzzing.py): garbage gets a snapshot (or a 204 for an ended
task), never a 500."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from .clients import read_stream
from .fuzzing import FUZZ, Stage, assert_healthy_and_idle, staged, task_id_texts

MAX_SEQ = (1 << 63) - 1


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    with staged() as stage:
        yield stage


header_bytes = st.sampled_from(
    [bytes([b]) for b in range(0x21, 0x7F)] + [bytes([b]) for b in range(0x80, 0x100)] + [b" "]
)
last_event_ids = st.one_of(
    st.lists(header_bytes, max_size=200).map(lambda bs: b"".join(bs).strip()),
    st.integers(1, 8000).map(lambda n: b"9" * n),
    st.integers(max_value=-1).map(lambda n: str(n).encode()),
    st.integers(min_value=MAX_SEQ - 2, max_value=MAX_SEQ * 4).map(lambda n: str(n).encode()),
    st.integers(1, 2000).map(lambda n: b"," * n),
    st.integers(1, 2000).map(lambda n: b":" * n),
    st.lists(st.tuples(task_id_texts, st.integers()), max_size=50).map(
        lambda pairs: ",".join(f"{t}:{s}" for t, s in pairs).encode("utf-8", "replace")
    ),
    st.text(max_size=50).map(lambda s: s.encode("utf-8")),
).map(lambda raw: bytes(b for b in raw if b == 0x09 or 0x20 <= b != 0x7F).strip())
# (Control characters are not HTTP: uvicorn refuses them before the relay sees the request.)


def is_decimal(raw: bytes) -> bool:
    return raw.strip().isdigit()


@FUZZ
@given(last_event_id=last_event_ids)
@example(last_event_id=b"9" * 5000)
@example(last_event_id=b"-1")
@example(last_event_id=b"\xff\xfe\x80")
@example(last_event_id=b"a:" + b"9" * 5000)
def test_garbage_last_event_id_gets_a_snapshot_or_a_204_never_a_500(
    stage: Stage, last_event_id: bytes
) -> None:
    headers = {"Last-Event-ID": last_event_id}
    relay = stage.relay.url
    running = read_stream(stage.http, f"{relay}/v1/tasks/{stage.long_task}/events", headers)
    assert running.status == 200, running
    # A number the relay happens to remember would get a patch; garbage gets a snapshot.
    expected = {"snapshot", "patch"} if is_decimal(last_event_id) else {"snapshot"}
    assert running.events and running.events[0].event in expected, running

    ended = read_stream(stage.http, f"{relay}/v1/tasks/{stage.ended_task}/events", headers)
    if is_decimal(last_event_id):
        assert ended.status in (200, 204), ended
    else:
        assert ended.status == 200, ended
    if ended.status == 200:
        assert ended.events and ended.events[0].event in ("snapshot", "patch"), ended

    url = f"{relay}/v1/events?taskId={stage.long_task}&taskId={stage.ended_task}"
    many = read_stream(stage.http, url, headers)
    assert many.status == 200, many
    assert many.events and many.events[0].event in ("snapshot", "patch"), many


def test_the_relay_is_healthy_and_idle_after_the_fuzzing(stage: Stage) -> None:
    assert_healthy_and_idle(stage)
