"""Fuzzed WebSocket frames on /v1/ws, against one real relay for the module (tests/fuzzing.py):
every bad frame gets an error reply, the socket stays usable, a well-behaved subscriber on
the same relay misses no update, and frames over 64 KiB close the socket with 1009."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from .clients import ThreadWatcher, recv_json
from .fuzzing import (
    FUZZ,
    Stage,
    assert_healthy_and_idle,
    is_valid_task_id,
    json_values,
    staged,
    valid_task_ids,
)

WS_LIMIT = 64 * 1024  # the relay's (uvicorn's) WebSocket message limit, in bytes


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    with staged() as stage:
        yield stage


any_characters = st.characters(exclude_categories=())  # lone surrogates included
bad_types = json_values.filter(lambda v: v not in ("subscribe", "unsubscribe"))
bad_task_ids = st.one_of(
    json_values.filter(lambda v: not isinstance(v, str)),
    st.text(alphabet=any_characters, max_size=40).filter(lambda s: not is_valid_task_id(s)),
    st.integers(129, 2000).map(lambda n: "a" * n),
)
bad_last_seqs = st.one_of(
    st.integers(max_value=-1),
    st.floats().filter(lambda f: not (math.isfinite(f) and f.is_integer())),
    st.text(max_size=20),
    st.booleans(),
    st.lists(json_values, max_size=3),
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)
message_types = st.sampled_from(["subscribe", "unsubscribe"])


def frame_of(value: Any) -> str:
    return json.dumps(value)  # ASCII with \u escapes: lone surrogates travel as escapes


def sized(prefix: str, suffix: str, size: int) -> str:
    return prefix + "x" * max(0, size - len(prefix) - len(suffix)) + suffix


bad_frames: st.SearchStrategy[str | bytes] = st.one_of(
    json_values.filter(lambda v: not isinstance(v, dict)).map(frame_of),
    st.fixed_dictionaries(
        {"type": bad_types},
        optional={"taskId": valid_task_ids | json_values, "lastSeq": json_values},
    ).map(frame_of),
    st.dictionaries(st.sampled_from(["taskId", "lastSeq", "Type", "TYPE"]), json_values).map(
        frame_of
    ),
    st.fixed_dictionaries({"type": message_types, "taskId": bad_task_ids}).map(frame_of),
    st.fixed_dictionaries({"type": message_types}, optional={"lastSeq": st.integers(0, 10)}).map(
        frame_of
    ),
    st.fixed_dictionaries(
        {"type": st.just("subscribe"), "taskId": valid_task_ids, "lastSeq": bad_last_seqs}
    ).map(frame_of),
    st.integers(1, WS_LIMIT // 2).map(lambda n: "[" * n + "]" * n),
    st.integers(1, WS_LIMIT // 6).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(1000, WS_LIMIT).map(lambda n: sized('{"type":"subscribe","taskId":"', '"}', n)),
    st.integers(1000, WS_LIMIT).map(lambda n: b"\x00" * n),
)


def is_well_formed(frame: str | bytes) -> bool:
    """A frame SPEC calls a valid message: a JSON object with a known type, a valid task ID
    and an optional non-negative whole lastSeq."""
    if isinstance(frame, bytes):
        return False
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError):
        return False
    if not isinstance(message, dict) or message.get("type") not in ("subscribe", "unsubscribe"):
        return False
    last_seq = message.get("lastSeq")
    return is_valid_task_id(message.get("taskId")) and (
        last_seq is None
        or (isinstance(last_seq, int) and not isinstance(last_seq, bool) and last_seq >= 0)
    )


async def fuzz_socket(ws_url: str, frames: list[str | bytes], task_id: str) -> None:
    async with websockets.connect(f"{ws_url}/v1/ws", max_size=None) as socket:
        for frame in frames:
            await socket.send(frame)
            reply = await recv_json(socket)
            assert reply["type"] == "error", (frame[:200], reply)
            assert "seq" not in reply, reply
            assert reply["data"]["code"] in ("bad_request", "invalid_task_id"), (frame[:200], reply)
            assert reply["data"]["retrying"] is False, reply
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        reply = await recv_json(socket)
        assert reply["type"] == "snapshot" and reply["taskId"] == task_id, reply


@pytest.mark.slow  # 3.2 s: 150 examples of up to six frames, some of 64 KiB
def test_bad_websocket_frames_get_error_replies_and_nobody_loses_an_update(
    stage: Stage,
) -> None:
    started = time.monotonic()
    with ThreadWatcher(stage.relay.ws_url, stage.long_task) as watcher:

        @FUZZ
        @given(frames=st.lists(bad_frames, min_size=1, max_size=6))
        @example(frames=['{"type":"subscribe","taskId":"\\ud800"}'])
        @example(frames=['{"type":"subscribe","taskId":"' + "a" * 129 + '"}'])
        @example(frames=[sized('{"type":"subscribe","taskId":"', '"}', WS_LIMIT)])
        @example(frames=[b"\xff" * WS_LIMIT, "[" * 30000 + "]" * 30000])
        def fuzz(frames: list[str | bytes]) -> None:
            assume(not any(is_well_formed(frame) for frame in frames))
            asyncio.run(fuzz_socket(stage.relay.ws_url, frames, stage.long_task))

        fuzz()
        time.sleep(0.5)  # the watcher sees the updates of the last examples too
    elapsed = time.monotonic() - started
    assert watcher.failure is None, repr(watcher.failure)
    frames = watcher.frames
    assert frames[0]["type"] == "snapshot", frames[0]
    assert all(f["type"] == "patch" and f["taskId"] == stage.long_task for f in frames[1:]), [
        f for f in frames if f["type"] != "patch"
    ][:3]
    seqs = [f["seq"] for f in frames]
    gaps = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
    assert not gaps, f"the watcher missed updates: {gaps[:5]}"
    # The loop polls every 0.1 s ±10 % and the simulated ETA moves with every poll.
    assert len(frames) >= elapsed / 0.11 * 0.5, (len(frames), elapsed)


@settings(FUZZ, max_examples=8)
@given(size=st.integers(WS_LIMIT + 1, 4 * WS_LIMIT), binary=st.booleans())
@example(size=WS_LIMIT + 1, binary=False)
def test_frames_over_64_kib_close_the_socket_with_1009(
    stage: Stage, size: int, binary: bool
) -> None:
    async def send_oversized() -> int | None:
        async with websockets.connect(f"{stage.relay.ws_url}/v1/ws", max_size=None) as socket:
            frame: str | bytes = b"x" * size if binary else sized('{"type":"', '"}', size)
            await socket.send(frame)
            try:
                await asyncio.wait_for(socket.recv(), 5)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd is not None else None
            return None

    assert asyncio.run(send_oversized()) == 1009


def test_the_relay_is_healthy_and_idle_after_the_fuzzing(stage: Stage) -> None:
    assert_healthy_and_idle(stage)
