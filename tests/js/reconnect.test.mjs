// Reconnecting: a connection that is down waits out a jittered backoff, unless the browser
// says it is back online or a hidden page is shown again; then it reconnects at once.
// Stand-ins for the browser are in fakes.mjs.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";

import { ConnectionState, RelayClient } from "../../static/relay-client.js";
import { FakeEventSource, FakePage, FakeWebSocket, install, restore, tick } from "./fakes.mjs";

const BASE = "http://relay.test/";
// A backoff far longer than any test: a reconnect within one came from an event.
const SLOW = { backoffInitialMs: 60_000, backoffMaxMs: 60_000 };

describe("reconnecting", () => {
  let client;

  afterEach(() => {
    client?.close();
    restore();
  });

  /** A client with one WebSocket task, whose socket has just dropped. */
  function droppedWebSocket(page) {
    install({ WebSocket: FakeWebSocket, page });
    client = new RelayClient(BASE, SLOW);
    client.subscribe("t1", { transport: "ws" });
    const socket = FakeWebSocket.opened[0];
    socket.open();
    socket.receive({ type: "snapshot", taskId: "t1", seq: 7, data: { status: "running", progress: 0.2 } });
    socket.drop();
    assert.equal(client.connectionState().ws, ConnectionState.DOWN);
    return socket;
  }

  test("a WebSocket that dropped waits out its backoff", async () => {
    droppedWebSocket(new FakePage());
    await tick();
    assert.equal(FakeWebSocket.opened.length, 1);
    assert.equal(client.connectionState().ws, ConnectionState.DOWN);
  });

  test("the online event reconnects the WebSocket at once, where it left off", () => {
    const page = new FakePage();
    droppedWebSocket(page);
    page.goOnline();
    assert.equal(FakeWebSocket.opened.length, 2);
    assert.equal(client.connectionState().ws, ConnectionState.RECONNECTING);
    const socket = FakeWebSocket.opened[1];
    socket.open();
    assert.deepEqual(socket.sent, [{ type: "subscribe", taskId: "t1", lastSeq: 7 }]);
    assert.equal(client.connectionState().ws, ConnectionState.OPEN);
  });

  test("showing a hidden page reconnects what is down, and leaves what is up alone", () => {
    const page = new FakePage();
    page.document.visibilityState = "hidden";
    droppedWebSocket(page);
    page.setVisibility("hidden");
    assert.equal(FakeWebSocket.opened.length, 1, "still hidden: nothing to do");
    page.setVisibility("visible");
    assert.equal(FakeWebSocket.opened.length, 2);
    FakeWebSocket.opened[1].open();

    page.setVisibility("hidden");
    page.setVisibility("visible");
    page.goOnline();
    assert.equal(FakeWebSocket.opened.length, 2, "an open socket is not replaced");
    assert.equal(FakeWebSocket.opened[1].readyState, FakeWebSocket.OPEN);
  });

  test("an EventSource the browser is retrying by itself is re-opened at once, resuming", async () => {
    const page = new FakePage();
    install({ EventSource: FakeEventSource, page });
    client = new RelayClient(BASE, SLOW);
    client.subscribe("t1", {});
    await tick();
    const [stream] = FakeEventSource.opened;
    stream.open();
    stream.receive("snapshot", { status: "running", progress: 0.2 }, "41");
    stream.drop();
    assert.equal(client.connectionState().sse, ConnectionState.RECONNECTING);

    page.goOnline();
    assert.equal(FakeEventSource.opened.length, 2);
    assert.equal(stream.readyState, FakeEventSource.CLOSED);
    const again = FakeEventSource.opened[1];
    assert.equal(new URL(again.url).searchParams.get("lastEventId"), "41");
    again.open();
    assert.equal(client.connectionState().sse, ConnectionState.OPEN);
    page.goOnline();
    assert.equal(FakeEventSource.opened.length, 2, "an open stream is not replaced");
  });

  test("an EventSource waiting out a backoff after the relay refused it tries again at once", async () => {
    const page = new FakePage();
    install({
      EventSource: FakeEventSource,
      page,
      fetch: async () => ({ status: 503, headers: { get: () => null }, json: async () => ({ code: "overloaded" }) }),
    });
    client = new RelayClient(BASE, SLOW);
    const errors = [];
    client.subscribe("t1", { onError: (error) => errors.push(error.code) });
    await tick();
    FakeEventSource.opened[0].giveUp();
    await tick();
    assert.deepEqual(errors, ["overloaded"]);
    assert.equal(client.connectionState().sse, ConnectionState.DOWN);
    assert.equal(FakeEventSource.opened.length, 1);
    page.goOnline();
    assert.equal(FakeEventSource.opened.length, 2);
  });

  test("close() stops listening to the page", () => {
    const page = new FakePage();
    droppedWebSocket(page);
    client.close();
    page.goOnline();
    page.setVisibility("visible");
    assert.equal(FakeWebSocket.opened.length, 1);
  });
});
