// The progress a bar shows: ProgressSmoother under a fake clock (times in ms, given to each
// call), then a RelayClient's onProgress driven by fake animation frames (fakes.mjs).

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";

import { DEFAULT_SMOOTHING, ProgressSmoother, RelayClient } from "../../static/relay-client.js";
import { FakeClock, FakeEventSource, FakePage, FakeWebSocket, install, restore, tick } from "./fakes.mjs";

const running = (progress, etaRelative, extra = {}) => ({ status: "running", progress, etaRelative, ...extra });
const close = (actual, expected, message) =>
  assert.ok(Math.abs(actual - expected) < 1e-9, `${message ?? ""} ${actual} is not ${expected}`);

describe("ProgressSmoother", () => {
  test("shows the first state as it is, without sweeping up from 0", () => {
    const smoother = new ProgressSmoother();
    assert.equal(smoother.value, 0);
    assert.equal(smoother.update(running(0.4, 10), 0), 0.4);
    assert.equal(smoother.valueAt(0), 0.4);
  });

  test("moves between reports at the rate the ETA gives, for horizonMs at most", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running(0.5, 100), 0); // 0.5 left in 100 s: 0.005 a second
    close(smoother.valueAt(1000), 0.505);
    close(smoother.valueAt(1500), 0.5075);
    assert.ok(smoother.moving(1500));
    close(smoother.valueAt(DEFAULT_SMOOTHING.horizonMs), 0.51);
    close(smoother.valueAt(60_000), 0.51, "no further than horizonMs on the ETA alone:");
    assert.equal(smoother.moving(60_000), false);
  });

  test("never runs more than maxLead ahead of what the upstream said", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running(0.2, 1), 0); // the ETA promises the rest in one second
    close(smoother.valueAt(500), 0.2 + DEFAULT_SMOOTHING.maxLead);
    close(smoother.valueAt(10_000), 0.2 + DEFAULT_SMOOTHING.maxLead);
    const tight = new ProgressSmoother({ maxLead: 0.01 });
    tight.update(running(0.2, 1), 0);
    close(tight.valueAt(10_000), 0.21);
  });

  test("a new node that starts lower does not pull the value back", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running(0.47, 19, { state: { step: 6, maxSteps: 20 } }), 0);
    const before = smoother.valueAt(900);
    const after = smoother.update(running(0.05, 30, { state: { step: 1, maxSteps: 20 } }), 1000);
    assert.ok(after >= before, `${after} < ${before}`);
    for (let t = 1000; t <= 20_000; t += 250) assert.ok(smoother.valueAt(t) >= after);
    // It waits where it is until the reports pass it, then follows them again.
    const waited = smoother.valueAt(20_000);
    assert.ok(waited <= 0.47 + DEFAULT_SMOOTHING.maxLead);
    smoother.update(running(0.8, 5), 21_000);
    assert.ok(smoother.valueAt(25_000) > 0.79);
  });

  test("catches up with a report ahead of it smoothly, not in one jump", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running(0.2, 0), 0); // no ETA: nothing to move on
    assert.equal(smoother.valueAt(900), 0.2);
    assert.equal(smoother.moving(900), false);
    assert.equal(smoother.update(running(0.6, 0), 1000), 0.2, "continuous at the report");
    const tau = DEFAULT_SMOOTHING.catchUpMs;
    close(smoother.valueAt(1000 + tau), 0.6 - 0.4 * Math.exp(-1));
    assert.ok(smoother.moving(1000 + tau));
    assert.equal(smoother.valueAt(1000 + 10 * tau), 0.6, "and lands on it exactly");
    assert.equal(smoother.moving(1000 + 10 * tau), false);
  });

  test("waiting in the queue does not move on an ETA", () => {
    const smoother = new ProgressSmoother();
    smoother.update({ status: "waiting", progress: 0, etaRelative: 30, lastQueueRemaining: 3 }, 0);
    assert.equal(smoother.valueAt(5000), 0);
    assert.equal(smoother.moving(5000), false);
  });

  test("is exactly 1 when the task succeeded, and only then", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running(0.98, 1), 0);
    const almost = smoother.valueAt(60_000);
    assert.ok(almost < 1 && almost <= DEFAULT_SMOOTHING.ceiling, String(almost));
    assert.equal(smoother.update({ status: "succeeded", progress: 1 }, 61_000), 1);
    assert.equal(smoother.valueAt(62_000), 1);
    // A success from far below is 1 at once, whatever its progress says.
    const early = new ProgressSmoother();
    early.update(running(0.1, 50), 0);
    assert.equal(early.update({ status: "succeeded" }, 100), 1);
    assert.equal(early.update(running(0.2, 5), 200), 1, "nothing moves it after the end");
  });

  test("a failed task stops where it is", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running(0.3, 10), 0);
    const at = smoother.update({ status: "failed", progress: 0.3, etaRelative: 0 }, 2000);
    assert.ok(at >= 0.3 && at < 1);
    assert.equal(smoother.valueAt(60_000), at);
    assert.equal(smoother.moving(60_000), false);
  });

  test("ignores what is not a number, and stays in [0, 1]", () => {
    const smoother = new ProgressSmoother();
    smoother.update(running("0.5", "soon"), 0);
    assert.equal(smoother.valueAt(1000), 0);
    smoother.update(running(7, -3), 2000);
    assert.equal(smoother.valueAt(10_000), 1);
    assert.equal(new ProgressSmoother().update({}, 0), 0);
  });

  test("never decreases, never leaves [0, 1], never far ahead, whatever the upstream says", () => {
    let seed = 42;
    const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    for (let run = 0; run < 200; run += 1) {
      const smoother = new ProgressSmoother();
      let now = 0;
      let last = 0;
      let highest = 0;
      for (let i = 0; i < 40; i += 1) {
        now += random() * 1500;
        const state = running(random(), random() < 0.2 ? 0 : random() * 60);
        highest = Math.max(highest, state.progress);
        const values = [smoother.valueAt(now), smoother.update(state, now)];
        for (let k = 1; k <= 5; k += 1) values.push(smoother.valueAt(now + k * 100 * random()));
        for (const value of values) {
          assert.ok(value >= last, `went back from ${last} to ${value}`);
          assert.ok(value >= 0 && value <= Math.min(DEFAULT_SMOOTHING.ceiling, highest + DEFAULT_SMOOTHING.maxLead) + 1e-12
            || value <= highest, `${value} is too far ahead of ${highest}`);
          last = value;
        }
      }
      assert.equal(smoother.update({ status: "succeeded" }, now + 1), 1);
    }
  });

  test("refuses unknown settings", () => {
    assert.throws(() => new ProgressSmoother({ maxlead: 0.1 }), /unknown smoothing option maxlead/);
    assert.throws(() => new ProgressSmoother({ horizonMs: -1 }), /horizonMs must be a number/);
    assert.ok(Object.isFrozen(DEFAULT_SMOOTHING));
  });
});

describe("onProgress", () => {
  let client;

  afterEach(() => {
    client?.close();
    restore();
  });

  test("moves in animation frames between two states, never back, and ends at 1", () => {
    const clock = new FakeClock();
    install({ WebSocket: FakeWebSocket, clock, page: new FakePage() });
    client = new RelayClient("http://relay.test/");
    const seen = [];
    const order = [];
    client.subscribe("t1", {
      transport: "ws",
      onProgress: (value, state) => {
        seen.push(value);
        order.push(["progress", value, state.status]);
      },
      onEnd: ({ status }) => order.push(["end", status]),
    });
    const socket = FakeWebSocket.opened[0];
    socket.open();
    socket.receive({ type: "snapshot", taskId: "t1", seq: 1, data: running(0.5, 50) });
    assert.deepEqual(seen, [0.5]);
    assert.equal(clock.pending, 1, "a frame is asked for");

    clock.advance(1000); // a second without news: the value moves on the ETA, frame by frame
    const between = seen.length;
    assert.ok(between > 30, `only ${between} values in a second of frames`);
    close(seen.at(-1), 0.51);

    // The next node starts lower: the value holds.
    socket.receive({ type: "patch", taskId: "t1", seq: 2, data: { progress: 0.1, etaRelative: 40 } });
    clock.advance(1000);
    socket.receive({ type: "patch", taskId: "t1", seq: 3, data: { progress: 0.7, etaRelative: 10 } });
    clock.advance(1000);
    socket.receive({ type: "patch", taskId: "t1", seq: 4, data: { status: "succeeded", progress: 1, etaRelative: 0 } });
    socket.receive({ type: "end", taskId: "t1", seq: 4, data: { status: "succeeded" } });

    for (let i = 1; i < seen.length; i += 1) assert.ok(seen[i] > seen[i - 1], `back at ${i}: ${seen}`);
    assert.equal(seen.at(-1), 1);
    assert.deepEqual(order.slice(-2), [["progress", 1, "succeeded"], ["end", "succeeded"]]);
    clock.advance(500);
    assert.equal(clock.pending, 0, "no frames once the task ended");
  });

  test("asks for no frames while nothing moves, nor for subscriptions without onProgress", () => {
    const clock = new FakeClock();
    install({ EventSource: FakeEventSource, clock, page: new FakePage() });
    client = new RelayClient("http://relay.test/");
    const seen = [];
    client.subscribe("quiet", { onState: () => {} });
    client.subscribe("bar", { onProgress: (value) => seen.push(value) });
    return tick().then(() => {
      const [stream] = FakeEventSource.opened;
      stream.open();
      const frame = (taskId, data) => stream.listeners.get("snapshot")({
        data: JSON.stringify({ taskId, data }),
        lastEventId: `${taskId}:1`,
      });
      frame("quiet", running(0.3, 10));
      assert.equal(clock.pending, 0);
      frame("bar", { status: "waiting", progress: 0, lastQueueRemaining: 2 });
      assert.deepEqual(seen, [0]);
      assert.equal(clock.pending, 0, "a waiting task's value does not move");
    });
  });

  test("runs on a timer while the page is hidden, and on frames again when it is shown", async () => {
    const clock = new FakeClock();
    const page = new FakePage();
    install({ WebSocket: FakeWebSocket, clock, page });
    page.document.visibilityState = "hidden";
    client = new RelayClient("http://relay.test/");
    const seen = [];
    client.subscribe("t1", { transport: "ws", onProgress: (value) => seen.push(value) });
    const socket = FakeWebSocket.opened[0];
    socket.open();
    socket.receive({ type: "snapshot", taskId: "t1", seq: 1, data: running(0.5, 50) });
    assert.equal(clock.pending, 0, "no animation frame for a hidden page");
    page.setVisibility("visible");
    assert.equal(clock.pending, 1);
    clock.advance(100);
    assert.ok(seen.at(-1) > 0.5);

    // Hidden again: the frame asked for would never come; the timer takes over.
    page.setVisibility("hidden");
    assert.equal(clock.pending, 0);
    const before = seen.length;
    clock.time += 1000; // no frames run: only the client's timer can see it
    await new Promise((resolve) => setTimeout(resolve, 250));
    assert.ok(seen.length > before, "the value moves on while the page is hidden");
  });

  test("a second subscriber to the same task gets the current value at once", async () => {
    const clock = new FakeClock();
    install({ WebSocket: FakeWebSocket, clock, page: new FakePage() });
    client = new RelayClient("http://relay.test/");
    client.subscribe("t1", { transport: "ws", onProgress: () => {} });
    const socket = FakeWebSocket.opened[0];
    socket.open();
    socket.receive({ type: "snapshot", taskId: "t1", seq: 1, data: running(0.5, 50) });
    clock.advance(1000);
    const late = [];
    client.subscribe("t1", { transport: "ws", onProgress: (value) => late.push(value) });
    await tick();
    close(late[0], 0.51);
  });
});
