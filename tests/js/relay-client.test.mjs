// Unit tests of static/relay-client.js under Node's own runner: `node --test tests/js/`.
// progress.test.mjs and reconnect.test.mjs test onProgress and reconnecting.
// The pure functions need no browser; the last tests drive a RelayClient over stand-ins
// for EventSource, WebSocket and fetch. tests/test_relay_client_js.py runs this file.
// static/package.json says `"type": "module"`, so that any Node (18 too) loads the client
// as the ES module browsers load.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";

import {
  ConnectionState,
  DEFAULT_OPTIONS,
  RelayClient,
  applyMergePatch,
  backoffDelay,
  combineStates,
  configure,
  isValidTaskId,
  mergeOptions,
  normalizeBaseUrl,
  parseSeq,
  parseStreamId,
  resumePosition,
  streamUrl,
  webSocketUrl,
} from "../../static/relay-client.js";
import { FakeEventSource, FakeWebSocket, install, restore, tick } from "./fakes.mjs";

const BASE = "http://relay.test/";

describe("applyMergePatch", () => {
  // RFC 7396, appendix A (the same list as tests/rfc7396.py): [target, patch, result]
  const examples = [
    [{ a: "b" }, { a: "c" }, { a: "c" }],
    [{ a: "b" }, { b: "c" }, { a: "b", b: "c" }],
    [{ a: "b" }, { a: null }, {}],
    [{ a: "b", b: "c" }, { a: null }, { b: "c" }],
    [{ a: ["b"] }, { a: "c" }, { a: "c" }],
    [{ a: "c" }, { a: ["b"] }, { a: ["b"] }],
    [{ a: { b: "c" } }, { a: { b: "d", c: null } }, { a: { b: "d" } }],
    [{ a: [{ b: "c" }] }, { a: [1] }, { a: [1] }],
    [["a", "b"], ["c", "d"], ["c", "d"]],
    [{ a: "b" }, ["c"], ["c"]],
    [{ a: "foo" }, null, null],
    [{ a: "foo" }, "bar", "bar"],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [[1, 2], { a: "b", c: null }, { a: "b" }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
  ];

  test("gives RFC 7396's results and leaves its input alone", () => {
    for (const [target, patch, expected] of examples) {
      const before = JSON.stringify(target);
      assert.deepEqual(applyMergePatch(target, patch), expected, JSON.stringify([target, patch]));
      assert.equal(JSON.stringify(target), before);
    }
  });

  test("shares the members a patch did not touch", () => {
    const target = { kept: { deep: [1, 2] }, changed: { x: 1 } };
    const result = applyMergePatch(target, { changed: { x: 2 } });
    assert.equal(result.kept, target.kept);
    assert.deepEqual(target.changed, { x: 1 });
  });

  test("a __proto__ member is data, never a prototype", () => {
    const out = applyMergePatch({}, JSON.parse('{"__proto__": {"polluted": 1}}'));
    assert.equal({}.polluted, undefined);
    assert.equal(Object.getPrototypeOf(out), Object.prototype);
    assert.equal(JSON.stringify(out), '{"__proto__":{"polluted":1}}');
  });
});

describe("sequence numbers and stream ids", () => {
  test("parseSeq takes whole numbers only", () => {
    assert.equal(parseSeq("1795610543499"), 1795610543499);
    assert.equal(parseSeq(12), 12);
    assert.equal(parseSeq("0"), 0);
    for (const bad of [undefined, null, "", "x", "-1", "1.5", "Infinity", "1e400", "9007199254740993"]) {
      assert.equal(parseSeq(bad), undefined, String(bad));
    }
  });

  test("parseStreamId reads every task's position", () => {
    const positions = parseStreamId("A:12,b_-9:1795610543500");
    assert.deepEqual([...positions], [["A", 12], ["b_-9", 1795610543500]]);
  });

  test("parseStreamId skips what it cannot read", () => {
    assert.deepEqual([...parseStreamId("")], []);
    assert.deepEqual([...parseStreamId(undefined)], []);
    assert.deepEqual([...parseStreamId("12")], []); // a one-task stream's id
    assert.deepEqual([...parseStreamId(":3,A:,A:x,bad id:4,B:5")], [["B", 5]]);
  });

  test("resumePosition: a plain number for one task, a list for many", () => {
    const seqs = new Map([["A", 12], ["B", undefined], ["C", 40]]);
    assert.equal(resumePosition(["A"], seqs), "12");
    assert.equal(resumePosition(["A", "B", "C"], seqs), "A:12,C:40");
    assert.equal(resumePosition(["B"], seqs), undefined);
    assert.equal(resumePosition(["B", "D"], seqs), undefined);
    // What one writes, the other reads back.
    assert.deepEqual([...parseStreamId(resumePosition(["A", "C"], seqs))], [["A", 12], ["C", 40]]);
  });
});

describe("URLs", () => {
  test("one task gets its own stream, several share /v1/events", () => {
    assert.equal(streamUrl(BASE, ["t1"]), "http://relay.test/v1/tasks/t1/events");
    const many = new URL(streamUrl(BASE, ["t1", "t2"], { token: "tok", seqs: new Map([["t2", 7]]) }));
    assert.equal(many.pathname, "/v1/events");
    assert.deepEqual(many.searchParams.getAll("taskId"), ["t1", "t2"]);
    assert.equal(many.searchParams.get("token"), "tok");
    assert.equal(many.searchParams.get("lastEventId"), "t2:7");
    const one = new URL(streamUrl("https://x.test/relay/", ["t1"], { seqs: new Map([["t1", 5]]) }));
    assert.equal(one.pathname, "/relay/v1/tasks/t1/events");
    assert.equal(one.searchParams.get("lastEventId"), "5");
  });

  test("the WebSocket URL follows the page's scheme", () => {
    assert.equal(webSocketUrl("http://relay.test/"), "ws://relay.test/v1/ws");
    assert.equal(webSocketUrl("https://relay.test/app/"), "wss://relay.test/app/v1/ws");
  });

  test("a base URL is made absolute and ends in a slash", () => {
    assert.equal(normalizeBaseUrl("https://relay.test/app"), "https://relay.test/app/");
    assert.equal(normalizeBaseUrl("/relay", "http://page.test/demo/"), "http://page.test/relay/");
    assert.equal(normalizeBaseUrl("http://relay.test/"), "http://relay.test/");
    assert.throws(() => normalizeBaseUrl("relative/without/page"));
  });
});

describe("backoffDelay", () => {
  const options = { backoffInitialMs: 500, backoffMaxMs: 15000 };

  test("doubles from the first delay up to the longest, with jitter in the upper half", () => {
    const ceilings = [500, 1000, 2000, 4000, 8000, 15000, 15000];
    ceilings.forEach((ceiling, attempt) => {
      assert.equal(backoffDelay(attempt, options, () => 0), ceiling / 2);
      assert.equal(backoffDelay(attempt, options, () => 0.5), (ceiling * 3) / 4);
      assert.ok(backoffDelay(attempt, options, () => 0.999999) < ceiling);
    });
  });

  test("stays finite however long the outage", () => {
    assert.equal(backoffDelay(10_000, options, () => 1), 15000);
    assert.equal(backoffDelay(-3, options, () => 0), 250);
  });

  test("spreads clients out", () => {
    const delays = new Set(Array.from({ length: 50 }, () => backoffDelay(3, options)));
    assert.ok(delays.size > 40);
    for (const delay of delays) assert.ok(delay >= 2000 && delay < 4000, String(delay));
  });
});

describe("connection states", () => {
  const { IDLE, CONNECTING, OPEN, RECONNECTING, DOWN } = ConnectionState;

  test("are named constants that cannot change", () => {
    assert.deepEqual(Object.values(ConnectionState).sort(), ["connecting", "down", "idle", "open", "reconnecting"]);
    assert.ok(Object.isFrozen(ConnectionState));
  });

  test("combine to the worst state among the connections in use", () => {
    assert.equal(combineStates([]), IDLE);
    assert.equal(combineStates([IDLE, IDLE]), IDLE);
    assert.equal(combineStates([OPEN, IDLE]), OPEN);
    assert.equal(combineStates([OPEN, CONNECTING]), CONNECTING);
    assert.equal(combineStates([RECONNECTING, CONNECTING]), RECONNECTING);
    assert.equal(combineStates([OPEN, DOWN, RECONNECTING]), DOWN);
  });
});

describe("options", () => {
  test("merging never changes the caller's object", () => {
    const mine = { maxTasksPerStream: 8 };
    const merged = mergeOptions(mine);
    assert.deepEqual(mine, { maxTasksPerStream: 8 });
    assert.equal(merged.maxTasksPerStream, 8);
    assert.equal(merged.backoffMaxMs, DEFAULT_OPTIONS.backoffMaxMs);
    assert.ok(Object.isFrozen(merged));
    assert.notEqual(merged, mine);
  });

  test("unknown options and wrong types are refused", () => {
    assert.throws(() => mergeOptions({ maxTaskPerStream: 8 }), /unknown option maxTaskPerStream/);
    assert.throws(() => mergeOptions({ backoffMaxMs: "15s" }), /backoffMaxMs must be a number/);
    assert.throws(() => configure({ nope: 1 }), /unknown option nope/);
  });
});

// ---------------------------------------------------------------------------
// A RelayClient over stand-ins for the browser's EventSource, WebSocket and fetch (fakes.mjs).

describe("RelayClient", () => {
  let client;

  afterEach(() => {
    client?.close();
    restore();
  });

  test("a relay with a lower stream cap shrinks the streams, not the caller's options", async () => {
    install({
      EventSource: FakeEventSource,
      fetch: async () => ({
        status: 400,
        headers: { get: () => null },
        json: async () => ({ code: "too_many_tasks", message: "at most 2", retrying: false }),
      }),
    });
    const options = { maxTasksPerStream: 32 };
    client = new RelayClient(BASE, options);
    for (const id of ["a", "b", "c", "d", "e"]) client.subscribe(id, {});
    await tick();
    assert.equal(FakeEventSource.opened.length, 1);
    FakeEventSource.opened[0].giveUp(); // the 400, which EventSource cannot read

    await tick();
    const retried = FakeEventSource.opened.slice(1).filter((es) => es.readyState !== FakeEventSource.CLOSED);
    assert.deepEqual(retried.map((es) => es.taskIds.length), [2, 2, 1]);
    assert.deepEqual(options, { maxTasksPerStream: 32 });
    assert.equal(client.options.maxTasksPerStream, 32);
    // Another client for the same relay starts from its own options again.
    assert.equal(new RelayClient(BASE, options).transports.sse.streamCap, 32);
  });

  test("the WebSocket reads idle as soon as no task is watched", async () => {
    install({ WebSocket: FakeWebSocket });
    client = new RelayClient(BASE, { wsIdleCloseMs: 60_000 });
    const seen = [];
    client.onConnection((state, detail) => seen.push([state, detail.ws]));
    const stop = client.subscribe("t1", { transport: "ws" });
    const socket = FakeWebSocket.opened[0];
    assert.equal(socket.url, "ws://relay.test/v1/ws");
    socket.open();
    assert.deepEqual(socket.sent, [{ type: "subscribe", taskId: "t1" }]);
    assert.equal(client.connectionState().ws, ConnectionState.OPEN);

    stop();
    assert.deepEqual(client.connectionState(), { state: "idle", sse: "idle", ws: "idle" });
    assert.equal(socket.readyState, FakeWebSocket.OPEN, "kept open a moment for the next subscription");
    assert.deepEqual(seen.at(-1), ["idle", "idle"]);

    // Back again on the same socket: live at once.
    const states = [];
    client.subscribe("t2", { transport: "ws", onState: (s) => states.push(s) });
    assert.equal(client.connectionState().ws, ConnectionState.OPEN);
    socket.receive({ type: "snapshot", taskId: "t2", seq: 10, data: { status: "running", progress: 0.1 } });
    socket.receive({ type: "patch", taskId: "t2", seq: 11, data: { progress: 0.2 } });
    assert.deepEqual(states.at(-1), { status: "running", progress: 0.2 });
    socket.receive({ type: "end", taskId: "t2", seq: 11, data: { status: "succeeded" } });
    assert.equal(client.connectionState().state, ConnectionState.IDLE);
  });
});

test("every name the README documents is still exported", async () => {
  const module = await import("../../static/relay-client.js");
  for (const name of ["subscribe", "onConnection", "connectionState", "configure", "applyMergePatch", "isValidTaskId"]) {
    assert.equal(typeof module[name], "function", name);
  }
  assert.ok(isValidTaskId("01j5t2qx82323pswaqykz9eq4"));
  assert.ok(!isValidTaskId("not a task!") && !isValidTaskId("") && !isValidTaskId("x".repeat(129)));
});
