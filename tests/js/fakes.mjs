// Stand-ins for what a browser gives relay-client.js: EventSource, WebSocket, a clock with
// animation frames, the window's `online` event and the document's visibility. Each test
// installs what it needs with `install()` and puts the real globals back with `restore()`.

export const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

export class FakeEventSource {
  static CLOSED = 2;
  static opened = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.listeners = new Map();
    FakeEventSource.opened.push(this);
  }

  addEventListener(type, fn) {
    this.listeners.set(type, fn);
  }

  close() {
    this.readyState = FakeEventSource.CLOSED;
  }

  get taskIds() {
    const url = new URL(this.url);
    return url.pathname === "/v1/events" ? url.searchParams.getAll("taskId") : [url.pathname.split("/")[3]];
  }

  open() {
    this.readyState = 1;
    this.onopen();
  }

  /** An event from the relay on a one-task stream. */
  receive(type, data, id = "") {
    this.listeners.get(type)({ data: JSON.stringify(data), lastEventId: id });
  }

  /** The connection dropped; the browser will retry by itself. */
  drop() {
    this.readyState = 0;
    this.listeners.get("error")({});
  }

  /** The browser gave up on the stream (what it does on a 4xx). */
  giveUp() {
    this.readyState = FakeEventSource.CLOSED;
    this.listeners.get("error")({});
  }
}

export class FakeWebSocket {
  static OPEN = 1;
  static opened = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWebSocket.opened.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close() {
    this.readyState = 3;
  }

  open() {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen();
  }

  receive(message) {
    this.onmessage({ data: JSON.stringify(message) });
  }

  /** The relay went away. */
  drop() {
    this.readyState = 3;
    this.onclose({ code: 1006 });
  }
}

/** A clock the test moves, and the animation frames requested against it. */
export class FakeClock {
  constructor() {
    this.time = 1000;
    this.frames = [];
  }

  now() {
    return this.time;
  }

  requestAnimationFrame(fn) {
    this.frames.push(fn);
    return this.frames.length;
  }

  cancelAnimationFrame(id) {
    this.frames[id - 1] = null;
  }

  /** Move the clock on by `ms`, one frame every 16 ms, running what each frame asks for. */
  advance(ms) {
    const end = this.time + ms;
    while (this.time < end) {
      this.time = Math.min(end, this.time + 16);
      const due = this.frames.filter(Boolean);
      this.frames = [];
      for (const fn of due) fn(this.time);
    }
  }

  get pending() {
    return this.frames.filter(Boolean).length;
  }
}

/** The page: an EventTarget for `online`, and a document whose visibility the test sets. */
export class FakePage {
  constructor() {
    this.window = new EventTarget();
    this.document = new EventTarget();
    this.document.visibilityState = "visible";
  }

  goOnline() {
    this.window.dispatchEvent(new Event("online"));
  }

  setVisibility(state) {
    this.document.visibilityState = state;
    this.document.dispatchEvent(new Event("visibilitychange"));
  }
}

const NAMES = [
  "EventSource",
  "WebSocket",
  "fetch",
  "performance",
  "requestAnimationFrame",
  "cancelAnimationFrame",
  "addEventListener",
  "removeEventListener",
  "document",
];
const saved = Object.fromEntries(NAMES.map((name) => [name, Object.getOwnPropertyDescriptor(globalThis, name)]));

/** Put stand-ins on globalThis: `{EventSource, WebSocket, fetch, clock, page}`, any of them. */
export function install({ EventSource, WebSocket, fetch, clock, page } = {}) {
  const set = (name, value) => Object.defineProperty(globalThis, name, { value, configurable: true, writable: true });
  if (EventSource) set("EventSource", EventSource);
  if (WebSocket) set("WebSocket", WebSocket);
  if (fetch) set("fetch", fetch);
  if (clock) {
    set("performance", { now: () => clock.now() });
    set("requestAnimationFrame", (fn) => clock.requestAnimationFrame(fn));
    set("cancelAnimationFrame", (id) => clock.cancelAnimationFrame(id));
  }
  if (page) {
    set("addEventListener", page.window.addEventListener.bind(page.window));
    set("removeEventListener", page.window.removeEventListener.bind(page.window));
    set("document", page.document);
  }
}

export function restore() {
  for (const name of NAMES) {
    if (saved[name]) Object.defineProperty(globalThis, name, saved[name]);
    else delete globalThis[name];
  }
  FakeEventSource.opened = [];
  FakeWebSocket.opened = [];
}
