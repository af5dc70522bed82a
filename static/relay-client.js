/**
 * relay-client.js: browser client for comfy-relay.
 *
 * An ES module with no dependencies and no build step. Most pages need one line:
 *
 *     import { subscribe } from "/static/relay-client.js";
 *     const stop = subscribe(taskId, {
 *       transport: "sse",                      // or "ws"
 *       onState: (state) => render(state),     // always the whole current state
 *       onProgress: (value) => (bar.value = value), // 0..1: smooth, never back, 1 on success
 *       onEnd: ({ status }) => done(status),   // "succeeded" | "failed"
 *       onError: (err) => warn(err),           // {code, message, retrying}
 *     });
 *
 * `subscribe()` talks to the relay this file was loaded from (the folder above
 * `/static/`). For another relay, or settings of your own, make a client per
 * relay and use its methods, which are the same:
 *
 *     const relay = new RelayClient("https://relay.example.com/", { maxTasksPerStream: 8 });
 *     relay.onConnection((state) => (indicator.dataset.state = state));
 *     relay.subscribe(taskId, { onState, onEnd, onError });
 *
 * The relay sends a full state first ("snapshot") and then JSON Merge Patches
 * (RFC 7396); the client applies them and hands out whole states.
 *
 * - WebSocket: one socket per client for every "ws" subscription. It
 *   reconnects with capped exponential backoff and jitter, and resubscribes
 *   every live task with the last sequence number it saw.
 * - Server-Sent Events: one task uses `/v1/tasks/{id}/events`; several tasks
 *   share one multiplexed `/v1/events?taskId=...` stream (browsers allow only
 *   six HTTP/1.1 connections per origin). The stream is re-opened with the new
 *   list when tasks are added or dropped, saying where each task stands, and
 *   closed once all of its tasks ended.
 *
 * The functions above the transports are pure (no DOM, no network) and are
 * exported so that `node --test` can check them (tests/js/).
 *
 * The same file is the npm package comfy-relay-client (package.json beside it), with its
 * TypeScript declarations in relay-client.d.ts: a change to the API changes both.
 *
 * @module relay-client
 */

/** Connection states, for the whole client and for each transport. */
export const ConnectionState = Object.freeze({
  /** nothing subscribed */
  IDLE: "idle",
  /** opening a first connection */
  CONNECTING: "connecting",
  /** connected: updates flow */
  OPEN: "open",
  /** lost, trying again at once (the browser's own EventSource retry) */
  RECONNECTING: "reconnecting",
  /** lost, waiting out a backoff before trying again */
  DOWN: "down",
});

/** The two ways to reach the relay. */
export const Transport = Object.freeze({ SSE: "sse", WS: "ws" });

/** Client settings, each of which `new RelayClient(url, options)` may override. */
export const DEFAULT_OPTIONS = Object.freeze({
  /** tasks per multiplexed SSE stream (the relay's default cap); more use several streams */
  maxTasksPerStream: 32,
  /** first reconnect delay, doubled per failure up to backoffMaxMs, with jitter */
  backoffInitialMs: 500,
  backoffMaxMs: 15000,
  /** how long an unused WebSocket stays open, in case a subscription follows */
  wsIdleCloseMs: 1000,
  /** send cookies on cross-origin SSE */
  sseWithCredentials: false,
});

const TASK_ID_RE = /^[A-Za-z0-9_-]{1,128}$/;
const TERMINAL_STATUSES = new Set(["succeeded", "failed"]);
// onProgress frames without requestAnimationFrame, or while the page is hidden (where
// browsers run timers at most once a second anyway).
const FRAME_FALLBACK_MS = 100;
const { IDLE, CONNECTING, OPEN, RECONNECTING, DOWN } = ConnectionState;

// ---------------------------------------------------------------------------
// Pure functions

/**
 * Whether a string is a valid task ID (1 to 128 of `[A-Za-z0-9_-]`), the rule
 * the relay enforces.
 *
 * @param {unknown} taskId
 * @returns {boolean}
 */
export function isValidTaskId(taskId) {
  return typeof taskId === "string" && TASK_ID_RE.test(taskId);
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function setOwn(obj, key, value) {
  // A plain assignment to "__proto__" would change the prototype instead.
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

/**
 * Apply an RFC 7396 JSON Merge Patch and return the result. The target is not
 * modified; unchanged members are shared with it. `null` in the patch deletes a
 * member, objects merge recursively, anything else (arrays too) replaces.
 *
 * @param {unknown} target
 * @param {unknown} patch
 * @returns {unknown}
 */
export function applyMergePatch(target, patch) {
  if (!isPlainObject(patch)) return patch;
  const result = isPlainObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else setOwn(result, key, applyMergePatch(result[key], value));
  }
  return result;
}

/**
 * A sequence number from an event id or a message's `seq`; undefined when there is none.
 *
 * @param {unknown} value
 * @returns {number | undefined}
 */
export function parseSeq(value) {
  if (value === undefined || value === null || value === "") return undefined;
  const n = Number(value);
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}

/**
 * The positions in a multiplexed stream's event id (`"A:12,B:40"`), as a Map
 * of task ID to sequence number. Malformed parts are skipped.
 *
 * @param {string | null | undefined} id
 * @returns {Map<string, number>}
 */
export function parseStreamId(id) {
  const positions = new Map();
  for (const part of (id ?? "").split(",")) {
    const at = part.lastIndexOf(":");
    const taskId = part.slice(0, at);
    const seq = parseSeq(part.slice(at + 1));
    if (at > 0 && isValidTaskId(taskId) && seq !== undefined) positions.set(taskId, seq);
  }
  return positions;
}

/**
 * Where a new stream for `ids` should resume, as its `lastEventId` parameter:
 * a plain number for a one-task stream, `"A:12,B:40"` for a multiplexed one
 * (only the tasks with a known seq); undefined when no task has one.
 *
 * @param {string[]} ids
 * @param {Map<string, number | undefined>} seqs
 * @returns {string | undefined}
 */
export function resumePosition(ids, seqs) {
  const held = ids.filter((id) => seqs.get(id) !== undefined);
  if (!held.length) return undefined;
  if (ids.length === 1) return String(seqs.get(ids[0]));
  return held.map((id) => `${id}:${seqs.get(id)}`).join(",");
}

/**
 * The URL of an SSE stream for one task or several.
 *
 * @param {string} baseUrl the relay's base URL, ending in "/"
 * @param {string[]} ids
 * @param {{token?: string, seqs?: Map<string, number | undefined>}} [options]
 * @returns {string}
 */
export function streamUrl(baseUrl, ids, { token, seqs = new Map() } = {}) {
  let target;
  if (ids.length === 1) {
    target = new URL(`v1/tasks/${encodeURIComponent(ids[0])}/events`, baseUrl);
  } else {
    target = new URL("v1/events", baseUrl);
    for (const id of ids) target.searchParams.append("taskId", id);
  }
  if (token !== undefined) target.searchParams.set("token", token);
  // A new EventSource sends no Last-Event-ID: say where each task stands, so the relay
  // sends patches for the tasks this page already holds instead of fresh snapshots.
  const position = resumePosition(ids, seqs);
  if (position !== undefined) target.searchParams.set("lastEventId", position);
  return target.href;
}

/**
 * The relay's WebSocket URL: ws: for http:, wss: for https:.
 *
 * @param {string} baseUrl
 * @returns {string}
 */
export function webSocketUrl(baseUrl) {
  const target = new URL("v1/ws", baseUrl);
  target.protocol = target.protocol === "https:" ? "wss:" : "ws:";
  return target.href;
}

/**
 * A base URL made absolute (against `against`, the page's address) and ending in "/".
 *
 * @param {string} url
 * @param {string} [against]
 * @returns {string}
 */
export function normalizeBaseUrl(url, against) {
  const absolute = new URL(url, against).href;
  return absolute.endsWith("/") ? absolute : `${absolute}/`;
}

/**
 * How long to wait before retry number `attempt` (0 for the first): a ceiling
 * that doubles from `backoffInitialMs` up to `backoffMaxMs`, and a random delay
 * between half of it and all of it, so that clients that lost the relay together
 * do not all come back in the same instant.
 *
 * @param {number} attempt
 * @param {{backoffInitialMs: number, backoffMaxMs: number}} options
 * @param {() => number} [random] uniform in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, { backoffInitialMs, backoffMaxMs }, random = Math.random) {
  const ceiling = Math.min(backoffMaxMs, backoffInitialMs * 2 ** Math.min(Math.max(attempt, 0), 16));
  return ceiling / 2 + random() * (ceiling / 2);
}

/**
 * One state for several connections: idle when none is in use, the worst
 * state among those in use otherwise (down, then reconnecting, then connecting).
 *
 * @param {string[]} states
 * @returns {string}
 */
export function combineStates(states) {
  const active = states.filter((s) => s !== IDLE);
  if (!active.length) return IDLE;
  return [DOWN, RECONNECTING, CONNECTING].find((s) => active.includes(s)) ?? OPEN;
}

/**
 * `DEFAULT_OPTIONS` with `options` over them, in a new frozen object: the
 * caller's object is never changed. Unknown keys and wrong types are refused.
 *
 * @param {object} [options]
 * @returns {Readonly<typeof DEFAULT_OPTIONS>}
 */
export function mergeOptions(options = {}) {
  for (const [key, value] of Object.entries(options)) {
    if (!(key in DEFAULT_OPTIONS)) throw new TypeError(`relay-client: unknown option ${key}`);
    if (typeof value !== typeof DEFAULT_OPTIONS[key]) {
      throw new TypeError(`relay-client: ${key} must be a ${typeof DEFAULT_OPTIONS[key]}`);
    }
  }
  return Object.freeze({ ...DEFAULT_OPTIONS, ...options });
}

/**
 * Settings of a `ProgressSmoother`, each of which its constructor may override.
 */
export const DEFAULT_SMOOTHING = Object.freeze({
  /** the furthest the value runs ahead of the progress the upstream last reported */
  maxLead: 0.1,
  /**
   * how long after a report the value keeps moving on the ETA alone, in ms: two of the
   * relay's default poll intervals, so that a late poll does not stall the bar
   */
  horizonMs: 2000,
  /** time constant of the catch-up when a report is ahead of the bar, in ms */
  catchUpMs: 400,
  /** the highest value reached on the ETA alone: only a success makes it 1 */
  ceiling: 0.99,
});

const SETTLED = 1e-4; // closer than this to where it is going, the value is there

function clamp01(value) {
  return Math.min(1, Math.max(0, value));
}

/**
 * A task's overall progress for a progress bar, from the states the relay sends:
 * a number in [0, 1] that never decreases, moves between reports toward where the
 * upstream's ETA says the task will be, runs at most `maxLead` ahead of the last
 * reported progress (and never to 1 on the ETA alone), and is exactly 1 once the
 * task succeeded. A failed task's value stays where it is.
 *
 * Pure: no timers, no DOM. The caller says what time it is (in milliseconds, from
 * any one clock, e.g. `performance.now()`); `RelayClient` drives one per task for
 * `onProgress`, and any other UI can drive its own:
 *
 *     const smoother = new ProgressSmoother();
 *     onState: (state) => smoother.update(state, performance.now()),
 *     // and in each animation frame:
 *     bar.value = smoother.valueAt(performance.now());
 */
export class ProgressSmoother {
  /** @param {Partial<typeof DEFAULT_SMOOTHING>} [options] */
  constructor(options = {}) {
    for (const [key, value] of Object.entries(options)) {
      if (!(key in DEFAULT_SMOOTHING)) throw new TypeError(`relay-client: unknown smoothing option ${key}`);
      if (typeof value !== "number" || !(value >= 0)) {
        throw new TypeError(`relay-client: ${key} must be a number, 0 or more`);
      }
    }
    this.options = Object.freeze({ ...DEFAULT_SMOOTHING, ...options });
    this.shown = 0; // the last value handed out: every later one is at least this
    this.started = false;
    this.done = false; // the task ended: the value moves no more
    this.reported = 0; // the upstream's last progress
    this.at = 0; // when it was reported
    this.rate = 0; // progress per ms that the ETA promises from then on
    this.gap = 0; // how far the bar was behind the report when it came
  }

  /** The last value handed out by `update` or `valueAt`. */
  get value() {
    return this.shown;
  }

  /**
   * Take a state the relay sent, received at `now`; returns the value at `now`.
   *
   * @param {{status?: unknown, progress?: unknown, etaRelative?: unknown}} state
   * @param {number} now
   * @returns {number}
   */
  update(state, now) {
    if (this.done) return this.shown;
    const status = state?.status;
    if (status === "succeeded") {
      this.done = true;
      this.shown = 1;
      return 1;
    }
    const shownNow = this.started ? this.valueAt(now) : 0;
    if (typeof state?.progress === "number" && Number.isFinite(state.progress)) {
      this.reported = clamp01(state.progress);
    }
    if (status === "failed") {
      // Stop where the upstream says it stopped, or where the bar already is.
      this.done = true;
      this.shown = Math.max(shownNow, this.reported);
      return this.shown;
    }
    const eta = state?.etaRelative;
    // Waiting: an ETA then may count the queue, and the work has not started.
    const moving = status === "running" && typeof eta === "number" && Number.isFinite(eta) && eta > 0;
    this.rate = moving ? (1 - this.reported) / (eta * 1000) : 0;
    this.at = now;
    if (!this.started) {
      // The first state: show it as it is, without sweeping up from 0.
      this.started = true;
      this.gap = 0;
      this.shown = this.reported;
      return this.shown;
    }
    this.gap = Math.max(0, this.reported - shownNow);
    return this.valueAt(now);
  }

  /**
   * The value to show at `now`: never lower than any value handed out before.
   *
   * @param {number} now
   * @returns {number}
   */
  valueAt(now) {
    if (this.done || !this.started) return this.shown;
    const elapsed = Math.max(0, now - this.at);
    const limit = this.limit();
    const ahead = Math.min(this.reported + this.rate * Math.min(elapsed, this.options.horizonMs), limit);
    const catchUp = this.options.catchUpMs > 0 ? Math.exp(-elapsed / this.options.catchUpMs) : 0;
    let value = ahead - this.gap * catchUp;
    if (value > limit - SETTLED) value = limit;
    this.shown = Math.max(this.shown, clamp01(value));
    return this.shown;
  }

  /**
   * Whether the value would still change without another update: false once the
   * task ended, or when the value reached what the last report and its ETA allow.
   *
   * @param {number} now
   * @returns {boolean}
   */
  moving(now) {
    if (this.done || !this.started) return false;
    return this.valueAt(now) < this.limit();
  }

  /** Where the value stops without another report. */
  limit() {
    const { maxLead, ceiling, horizonMs } = this.options;
    const reach = this.reported + Math.min(this.rate * horizonMs, maxLead);
    return Math.max(this.reported, Math.min(reach, ceiling));
  }
}

// ---------------------------------------------------------------------------
// Helpers for the transports

function defaultBaseUrl() {
  try {
    return new URL("../", import.meta.url).href;
  } catch {
    return globalThis.location ? new URL("/", globalThis.location.href).href : "/";
  }
}

function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

/** Call a user's callback; its exceptions are reported, never thrown into the client. */
function call(fn, ...args) {
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (error) {
    report(error);
  }
}

/** One task as seen by one client on one transport, shared by all subscribe() calls for it. */
class TaskEntry {
  constructor(taskId, token, frames) {
    this.taskId = taskId;
    this.token = token; // string, or a function returning one, or undefined
    this.state = undefined;
    this.seq = undefined;
    this.handlers = new Set();
    this.attempts = 0; // WebSocket: resubscriptions after "overloaded"
    this.retryTimer = null;
    this.frames = frames; // the client's ProgressFrames, which move onProgress between states
    this.smoother = new ProgressSmoother();
    this.over = false;
  }

  currentToken() {
    let token = this.token;
    if (typeof token === "function") {
      try {
        token = token();
      } catch (error) {
        report(error);
        token = undefined;
      }
    }
    return typeof token === "string" && token !== "" ? token : undefined;
  }

  snapshot(data, seq) {
    this.state = data;
    this.attempts = 0;
    if (seq !== undefined) this.seq = seq;
    this.emit("snapshot", undefined);
  }

  patch(data, seq) {
    this.state = applyMergePatch(this.state, data);
    if (seq !== undefined) this.seq = seq;
    this.emit("patch", data);
  }

  emit(kind, patch) {
    const info = { taskId: this.taskId, seq: this.seq, kind, patch };
    for (const h of [...this.handlers]) call(h.onState, this.state, info);
    const now = this.frames.now();
    this.smoother.update(this.state, now);
    this.sendProgress();
    if (this.wantsProgress() && this.smoother.moving(now)) this.frames.add(this);
  }

  end(status) {
    const info = { taskId: this.taskId, status: status ?? this.state?.status, state: this.state };
    this.over = true;
    this.frames.delete(this);
    if (info.status === "succeeded" || info.status === "failed") {
      this.smoother.update({ ...this.state, status: info.status }, this.frames.now());
      this.sendProgress();
    }
    for (const h of [...this.handlers]) call(h.onEnd, info);
  }

  error(err) {
    const info = { retrying: false, ...err, taskId: this.taskId };
    if (info.retrying !== true) {
      this.over = true;
      this.frames.delete(this);
    }
    for (const h of [...this.handlers]) call(h.onError, info);
  }

  isTerminal() {
    return TERMINAL_STATUSES.has(this.state?.status);
  }

  wantsProgress() {
    return !this.over && [...this.handlers].some((h) => typeof h.onProgress === "function");
  }

  /** Hand each onProgress the smoothed value, when it differs from the last one it got. */
  sendProgress() {
    if (this.state === undefined) return;
    const value = this.smoother.value;
    for (const h of [...this.handlers]) {
      if (typeof h.onProgress !== "function" || h.progress === value) continue;
      h.progress = value;
      call(h.onProgress, value, this.state);
    }
  }

  /** One animation frame: returns whether the value still moves. */
  frame(now) {
    if (!this.wantsProgress()) return false;
    const moving = this.smoother.moving(now);
    this.sendProgress();
    return moving;
  }
}

/**
 * Moves the `onProgress` values of a client's tasks between the relay's states: at
 * display rate with `requestAnimationFrame` while the page is visible, on a timer
 * otherwise (a hidden page, a worker, Node), and not at all while no value moves.
 */
class ProgressFrames {
  constructor() {
    this.entries = new Set();
    this.cancel = null; // cancels the pending frame
  }

  now() {
    return globalThis.performance?.now?.() ?? Date.now();
  }

  add(entry) {
    this.entries.add(entry);
    this.schedule();
  }

  delete(entry) {
    this.entries.delete(entry);
    if (this.entries.size === 0) this.stop();
  }

  schedule() {
    if (this.cancel || this.entries.size === 0) return;
    const frame = () => {
      this.cancel = null;
      const now = this.now();
      for (const entry of [...this.entries]) if (!entry.frame(now)) this.entries.delete(entry);
      this.schedule();
    };
    const visible = globalThis.document?.visibilityState !== "hidden";
    if (visible && typeof globalThis.requestAnimationFrame === "function") {
      const id = globalThis.requestAnimationFrame(frame);
      this.cancel = () => globalThis.cancelAnimationFrame?.(id);
    } else {
      const id = setTimeout(frame, FRAME_FALLBACK_MS);
      this.cancel = () => clearTimeout(id);
    }
  }

  /** The page was hidden or shown: a frame requested before may never come, or come late. */
  reschedule() {
    this.stop();
    this.schedule();
  }

  stop() {
    this.cancel?.();
    this.cancel = null;
  }
}

// ---------------------------------------------------------------------------
// The transports. Both have the same small interface, which is all RelayClient uses:
//   tasks        Map of task ID to TaskEntry, the live subscriptions
//   state        a ConnectionState, IDLE whenever no task is subscribed
//   add(entry)   start delivering a task's events to entry
//   remove(id)   stop, and tell the relay when the connection stays open
//   retryNow()   reconnect now what is down (the browser is back online, the page visible)
//   close()      drop everything

/** One WebSocket for all of a client's "ws" subscriptions. */
class WebSocketTransport {
  constructor(client) {
    this.client = client;
    this.tasks = new Map();
    this.socket = null;
    this.status = IDLE; // of the socket, which may outlive the last subscription a moment
    this.attempts = 0;
    this.recovering = false; // lost the connection, not yet back
    this.retryTimer = null;
    this.idleTimer = null;
  }

  get state() {
    return this.tasks.size ? this.status : IDLE;
  }

  add(entry) {
    this.tasks.set(entry.taskId, entry);
    clearTimeout(this.idleTimer);
    this.idleTimer = null;
    if (this.socket) this.send(this.subscribeMessage(entry)); // sent on open otherwise
    else if (!this.retryTimer) this.connect();
  }

  remove(taskId) {
    const entry = this.tasks.get(taskId);
    if (!entry) return;
    this.tasks.delete(taskId);
    clearTimeout(entry.retryTimer);
    this.send({ type: "unsubscribe", taskId });
    this.maybeIdle();
  }

  retryNow() {
    if (!this.retryTimer) return;
    clearTimeout(this.retryTimer);
    this.connect();
  }

  close() {
    for (const entry of this.tasks.values()) clearTimeout(entry.retryTimer);
    this.tasks.clear();
    clearTimeout(this.retryTimer);
    clearTimeout(this.idleTimer);
    this.retryTimer = this.idleTimer = null;
    const socket = this.socket;
    this.socket = null;
    this.status = IDLE;
    if (socket) socket.close(1000, "client closed");
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  subscribeMessage(entry) {
    const message = { type: "subscribe", taskId: entry.taskId };
    if (entry.seq !== undefined) message.lastSeq = entry.seq;
    const token = entry.currentToken();
    if (token !== undefined) message.token = token;
    return message;
  }

  connect() {
    this.retryTimer = null;
    if (this.socket || this.tasks.size === 0) return;
    let socket;
    try {
      socket = new WebSocket(webSocketUrl(this.client.baseUrl));
    } catch (error) {
      report(error);
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    this.status = this.recovering ? RECONNECTING : CONNECTING;
    this.client.updateConnection();

    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.recovering = false;
      this.status = OPEN;
      for (const entry of this.tasks.values()) this.send(this.subscribeMessage(entry));
      this.client.updateConnection();
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.attempts = 0; // the relay talks to us: the next outage starts over
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.handle(message);
    };
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.tasks.size === 0) {
        this.status = IDLE;
        this.client.updateConnection();
        return;
      }
      this.scheduleReconnect();
    };
    socket.onerror = () => {}; // a close event follows
  }

  scheduleReconnect() {
    this.status = DOWN;
    this.recovering = true;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), this.client.backoff(this.attempts++));
    this.client.updateConnection();
  }

  handle(message) {
    if (!message || typeof message !== "object") return;
    const entry = message.taskId !== undefined ? this.tasks.get(message.taskId) : undefined;
    if (!entry) {
      if (message.type === "error") console.warn("relay-client: relay error", message.data);
      return;
    }
    const seq = parseSeq(message.seq);
    switch (message.type) {
      case "snapshot":
        entry.snapshot(message.data, seq);
        break;
      case "patch":
        if (entry.state === undefined) {
          // Nothing to patch: ask for a fresh snapshot.
          entry.seq = undefined;
          this.send({ type: "unsubscribe", taskId: entry.taskId });
          this.send(this.subscribeMessage(entry));
        } else {
          entry.patch(message.data, seq);
        }
        break;
      case "end":
        this.forget(entry);
        entry.end(message.data?.status);
        this.maybeIdle();
        break;
      case "error": {
        const err = message.data ?? {};
        if (err.retrying === true) {
          // "overloaded" refused the subscription: ask again later. Other retrying
          // errors (upstream_unavailable) are retried by the relay itself.
          if (err.code === "overloaded") this.resubscribeLater(entry);
          entry.error(err);
        } else {
          this.forget(entry);
          entry.error(err);
          this.maybeIdle();
        }
        break;
      }
      default:
        break;
    }
  }

  forget(entry) {
    this.tasks.delete(entry.taskId);
    clearTimeout(entry.retryTimer);
  }

  resubscribeLater(entry) {
    clearTimeout(entry.retryTimer);
    entry.retryTimer = setTimeout(() => {
      entry.retryTimer = null;
      if (this.tasks.get(entry.taskId) === entry) this.send(this.subscribeMessage(entry));
    }, this.client.backoff(entry.attempts++));
  }

  /** No task left: stop retrying, and close the socket unless a subscription comes soon. */
  maybeIdle() {
    if (this.tasks.size > 0) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.attempts = 0;
    this.recovering = false;
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      this.idleTimer = null;
      if (this.tasks.size > 0) return;
      const socket = this.socket;
      this.socket = null;
      this.status = IDLE;
      if (socket) socket.close(1000, "no subscriptions");
    }, this.client.options.wsIdleCloseMs);
    if (!this.socket) this.status = IDLE;
    this.client.updateConnection();
  }
}

/** Server-Sent Events: one stream for one task, one multiplexed stream for many. */
class SseTransport {
  constructor(client) {
    this.client = client;
    this.tasks = new Map();
    this.streams = new Set();
    this.attempts = 0;
    this.retryTimer = null; // waiting out a backoff
    this.probing = false; // asking the relay why it refused a stream
    this.reconcileQueued = false;
    this.recovering = false; // a stream failed, not yet back
    // Tasks per stream: the client's option until a relay with a lower cap says so.
    this.streamCap = client.options.maxTasksPerStream;
  }

  get state() {
    if (this.tasks.size === 0) return IDLE;
    if (this.retryTimer || this.probing) return DOWN;
    if (this.streams.size === 0) return CONNECTING;
    return combineStates([...this.streams].map((s) => s.state));
  }

  add(entry) {
    this.tasks.set(entry.taskId, entry);
    this.scheduleReconcile();
  }

  remove(taskId) {
    if (!this.tasks.delete(taskId)) return;
    for (const stream of this.streams) {
      if (!stream.live.delete(taskId)) continue;
      if (stream.live.size === 0) this.closeStream(stream);
      else stream.stale = true; // lets the relay drop the task's poll loop
    }
    if (this.tasks.size === 0) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.attempts = 0;
      this.recovering = false;
    }
    this.scheduleReconcile();
  }

  retryNow() {
    // Streams the browser is retrying by itself wait out the relay's `retry:` hint (several
    // seconds during a shutdown): re-open those too.
    const retrying = [...this.streams].filter((stream) => stream.state === RECONNECTING);
    if (!this.retryTimer && retrying.length === 0) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    for (const stream of retrying) stream.stale = true;
    this.reconcile();
  }

  close() {
    for (const stream of this.streams) this.closeStream(stream);
    this.tasks.clear();
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  scheduleReconcile() {
    if (this.reconcileQueued) return;
    this.reconcileQueued = true;
    // A macrotask, so that a page subscribing to many tasks in one go opens one stream.
    setTimeout(() => {
      this.reconcileQueued = false;
      this.reconcile();
    }, 0);
  }

  /** Open, re-open or close streams so that every live task is on exactly one. */
  reconcile() {
    if (this.retryTimer || this.probing) return; // it reconciles when done
    let covered = 0;
    let rebuild = false;
    for (const stream of this.streams) {
      if (stream.live.size === 0) this.closeStream(stream);
      else if (stream.stale) rebuild = true;
      else covered += stream.live.size;
    }
    if (covered !== this.tasks.size) rebuild = true;
    if (rebuild) {
      for (const stream of this.streams) this.closeStream(stream);
      // A stream carries one token: tasks are grouped by token, then chunked.
      const groups = new Map();
      for (const entry of this.tasks.values()) {
        const token = entry.currentToken();
        if (!groups.has(token)) groups.set(token, []);
        groups.get(token).push(entry.taskId);
      }
      const size = Math.max(1, this.streamCap);
      for (const [token, ids] of groups) {
        for (let i = 0; i < ids.length; i += size) this.openStream(ids.slice(i, i + size), token);
      }
    }
    this.client.updateConnection();
  }

  url(ids, token) {
    const seqs = new Map(ids.map((id) => [id, this.tasks.get(id)?.seq]));
    return streamUrl(this.client.baseUrl, ids, { token, seqs });
  }

  openStream(ids, token) {
    const single = ids.length === 1;
    const es = new EventSource(this.url(ids, token), {
      withCredentials: this.client.options.sseWithCredentials,
    });
    const stream = {
      es,
      token,
      live: new Set(ids),
      stale: false,
      state: this.recovering ? RECONNECTING : CONNECTING,
    };
    this.streams.add(stream);

    const taskOf = (event) => {
      let payload;
      try {
        payload = JSON.parse(event.data);
      } catch {
        return {}; // not JSON: matches no task
      }
      if (single) return { taskId: ids[0], data: payload, seq: parseSeq(event.lastEventId) };
      const taskId = payload?.taskId;
      return { taskId, data: payload?.data, seq: parseStreamId(event.lastEventId).get(taskId) };
    };
    const entryFor = (taskId) => (stream.live.has(taskId) ? this.tasks.get(taskId) : undefined);

    es.onopen = () => {
      if (!this.streams.has(stream)) return;
      stream.state = OPEN;
      this.recovering = false;
      this.attempts = 0;
      this.client.updateConnection();
    };
    es.addEventListener("snapshot", (event) => {
      const { taskId, data, seq } = taskOf(event);
      entryFor(taskId)?.snapshot(data, seq);
    });
    es.addEventListener("patch", (event) => {
      const { taskId, data, seq } = taskOf(event);
      const entry = entryFor(taskId);
      if (!entry) return;
      if (entry.state === undefined) {
        stream.stale = true; // cannot patch nothing: re-open for a snapshot
        this.scheduleReconcile();
        return;
      }
      entry.patch(data, seq);
    });
    es.addEventListener("end", (event) => {
      const { taskId, data } = taskOf(event);
      const entry = entryFor(taskId);
      if (!entry) return;
      this.finish(stream, entry);
      entry.end(data?.status);
    });
    es.addEventListener("error", (event) => {
      if (!this.streams.has(stream)) return;
      if (typeof event.data === "string") {
        // an "error" event sent by the relay
        const { taskId, data } = taskOf(event);
        const err = data ?? {};
        const targets = taskId !== undefined ? [entryFor(taskId)] : [...stream.live].map(entryFor);
        for (const entry of targets) {
          if (!entry) continue;
          if (err.retrying !== true) this.finish(stream, entry);
          entry.error(err);
        }
        return;
      }
      // the connection failed
      if (es.readyState === EventSource.CLOSED) this.streamClosed(stream);
      else stream.state = RECONNECTING; // the browser retries by itself
      this.client.updateConnection();
    });
    return stream;
  }

  /** The task is over on this stream: forget it, close the stream if it was the last. */
  finish(stream, entry) {
    stream.live.delete(entry.taskId);
    if (this.tasks.get(entry.taskId) === entry) this.tasks.delete(entry.taskId);
    if (stream.live.size === 0) this.closeStream(stream);
    this.client.updateConnection();
  }

  closeStream(stream) {
    stream.es.close();
    this.streams.delete(stream);
  }

  /**
   * The browser gave up on a stream: the relay answered something other than an
   * event stream (the 204 for tasks that already ended, a 4xx, a 503), or the
   * browser deems the failure final. EventSource does not say which, so ask the
   * same URL once and act on the status: tasks whose last state is terminal are
   * over, a 4xx is a final error, anything else is retried after a backoff.
   */
  streamClosed(stream) {
    this.closeStream(stream);
    for (const taskId of [...stream.live]) {
      const entry = this.tasks.get(taskId);
      if (entry && entry.isTerminal()) {
        this.finish(stream, entry);
        entry.end(entry.state.status);
      }
    }
    if (stream.live.size === 0) return;
    this.recovering = true;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.probing = true;
    const ids = [...stream.live];
    this.probe(this.url(ids, stream.token)).then(({ status, body, retryAfter }) => {
      this.probing = false;
      const entries = ids.map((id) => this.tasks.get(id)).filter(Boolean);
      const code = typeof body?.code === "string" ? body.code : undefined;
      if (status === 400 && code === "too_many_tasks" && ids.length > 1) {
        // The relay's cap is lower than ours: use smaller streams from now on.
        this.streamCap = Math.max(1, Math.floor(ids.length / 2));
        this.reconcile();
        return;
      }
      if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
        const err = {
          code: code ?? (status === 401 || status === 403 ? "unauthorized" : "bad_request"),
          message: typeof body?.message === "string" ? body.message : `the relay answered HTTP ${status}`,
          retrying: false,
        };
        for (const entry of entries) {
          this.tasks.delete(entry.taskId);
          entry.error(err);
        }
        this.reconcile();
        return;
      }
      if (status === 429 || status === 503) {
        const err = { code: code ?? "overloaded", message: body?.message ?? `HTTP ${status}`, retrying: true };
        for (const entry of entries) entry.error(err);
      }
      if (this.tasks.size === 0) {
        this.client.updateConnection();
        return;
      }
      const delay = Math.max(this.client.backoff(this.attempts++), retryAfter * 1000);
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        this.reconcile();
      }, Math.min(delay, this.client.options.backoffMaxMs * 4));
      this.client.updateConnection();
    });
  }

  /** GET a stream URL just for its status (and error body); 0 when unreachable. */
  async probe(target) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), 10000);
    try {
      const response = await fetch(target, {
        signal: controller.signal,
        headers: { accept: "text/event-stream" },
        cache: "no-store",
        credentials: this.client.options.sseWithCredentials ? "include" : "same-origin",
      });
      const retryAfter = Number(response.headers.get("retry-after")) || 0;
      let body = null;
      if (response.status >= 400) body = await response.json().catch(() => null);
      return { status: response.status, body, retryAfter };
    } catch {
      return { status: 0, body: null, retryAfter: 0 };
    } finally {
      clearTimeout(timer);
      controller.abort(); // a 200 is a live stream: drop it, EventSource re-opens
    }
  }
}

// ---------------------------------------------------------------------------

/**
 * A connection to one relay: its subscriptions over both transports, and the
 * state of its connections. Make one per relay URL and share it.
 */
export class RelayClient {
  /**
   * @param {string} [baseUrl] the relay, e.g. "https://relay.example.com/" (default: the
   *   folder above the `/static/` this module was served from)
   * @param {Partial<typeof DEFAULT_OPTIONS>} [options] copied: later changes to the object
   *   do nothing, and the client never writes to it
   */
  constructor(baseUrl = defaultBaseUrl(), options = {}) {
    this.baseUrl = normalizeBaseUrl(baseUrl, globalThis.location?.href);
    this.options = mergeOptions(options);
    this.transports = { [Transport.SSE]: new SseTransport(this), [Transport.WS]: new WebSocketTransport(this) };
    this.listeners = new Set();
    this.last = { state: IDLE, sse: IDLE, ws: IDLE };
    this.frames = new ProgressFrames();
    // Back online, or back in front of the user: reconnect now instead of waiting out a
    // backoff (the browser may also have slowed the hidden page's timers down).
    this.onOnline = () => this.reconnectNow();
    this.onVisibility = () => {
      // Hidden pages get no animation frames: switch between frames and the timer.
      this.frames.reschedule();
      if (globalThis.document?.visibilityState === "visible") this.reconnectNow();
    };
    globalThis.addEventListener?.("online", this.onOnline);
    globalThis.document?.addEventListener?.("visibilitychange", this.onVisibility);
  }

  /**
   * Reconnect at once every connection that is down: waiting out a backoff, or left to
   * the browser's own EventSource retry. Connections that are up are left alone. The
   * client calls it by itself when the browser goes back online and when a hidden page
   * is shown again.
   */
  reconnectNow() {
    Object.values(this.transports).forEach((t) => t.retryNow());
  }

  /**
   * Subscribe to a task's progress.
   *
   * Subscribing twice to the same task on the same transport shares one
   * subscription; a late subscriber gets the current state at once.
   *
   * @param {string} taskId 1 to 128 of `[A-Za-z0-9_-]`; anything else calls
   *   `onError` with code "invalid_task_id" and subscribes to nothing.
   * @param {object} [options]
   * @param {"sse"|"ws"} [options.transport="sse"] Server-Sent Events or the client's WebSocket.
   * @param {string | (() => string)} [options.token] Access token, when the relay requires
   *   them (`RELAY_TOKEN_SECRET`); a function is called again at every (re)subscription, so
   *   it can hand out a fresh one. SSE tasks with the same token share a stream: mint one
   *   token for all the tasks a page shows.
   * @param {(state: object, info: {taskId: string, seq?: number, kind: "snapshot"|"patch", patch?: object}) => void} [options.onState]
   *   Called with the whole current state after every snapshot and patch. Treat
   *   it as read-only: unchanged parts are shared between calls.
   * @param {(info: {taskId: string, status: string, state: object}) => void} [options.onEnd]
   *   Called once when the task reached a terminal status; the subscription is over.
   * @param {(error: {taskId: string, code: string, message: string, retrying: boolean}) => void} [options.onError]
   *   Called on relay errors. With `retrying: true` (e.g. "upstream_unavailable")
   *   the subscription goes on; otherwise (e.g. "task_not_found") it is over and
   *   `onEnd` is not called.
   * @param {(value: number, state: object) => void} [options.onProgress]
   *   The task's overall progress for a progress bar, in [0, 1], with the current
   *   state: it never decreases, moves between the relay's states toward where the
   *   upstream's ETA says the task will be (in animation frames while the page is
   *   visible), and is exactly 1 when the task succeeded. See `ProgressSmoother`.
   * @returns {() => void} unsubscribe (safe to call more than once, or after the end)
   */
  subscribe(taskId, options = {}) {
    const { transport = Transport.SSE, token, onState, onEnd, onError, onProgress } = options;
    if (!Object.values(Transport).includes(transport)) {
      throw new TypeError(`relay-client: transport must be "sse" or "ws", not ${JSON.stringify(transport)}`);
    }
    const carrier = this.transports[transport];
    const handler = { onState, onEnd, onError, onProgress, progress: undefined };
    if (!isValidTaskId(taskId)) {
      queueMicrotask(() =>
        call(onError, {
          taskId,
          code: "invalid_task_id",
          message: "A task ID is 1 to 128 characters of A-Z, a-z, 0-9, _ and -.",
          retrying: false,
        }),
      );
      return () => {};
    }
    let entry = carrier.tasks.get(taskId);
    if (entry) {
      entry.handlers.add(handler);
      if (entry.token === undefined) entry.token = token;
      if (entry.state !== undefined) {
        queueMicrotask(() => {
          if (entry.handlers.has(handler) && entry.state !== undefined) {
            call(onState, entry.state, { taskId, seq: entry.seq, kind: "snapshot", patch: undefined });
            entry.sendProgress();
            if (entry.wantsProgress()) entry.frames.add(entry);
          }
        });
      }
    } else {
      entry = new TaskEntry(taskId, token, this.frames);
      entry.handlers.add(handler);
      carrier.add(entry);
    }
    this.updateConnection();

    let active = true;
    return () => {
      if (!active) return;
      active = false;
      entry.handlers.delete(handler);
      if (entry.handlers.size > 0 || carrier.tasks.get(taskId) !== entry) return;
      carrier.remove(taskId);
      this.updateConnection();
    };
  }

  /**
   * Listen to the client's connection to the relay. `fn(state, detail)` is called
   * at once with the current state and again on every change. `state` is a
   * `ConnectionState`; `detail` has one for each transport: `{sse, ws}`. A
   * transport with no subscription is IDLE, whatever it keeps open.
   *
   * @param {(state: string, detail: {sse: string, ws: string}) => void} fn
   * @returns {() => void} removes the listener
   */
  onConnection(fn) {
    this.listeners.add(fn);
    call(fn, this.last.state, { sse: this.last.sse, ws: this.last.ws });
    return () => this.listeners.delete(fn);
  }

  /**
   * The current connection state, as passed to `onConnection` listeners.
   *
   * @returns {{state: string, sse: string, ws: string}}
   */
  connectionState() {
    return { ...this.last };
  }

  /** Whether any task is subscribed. */
  get busy() {
    return Object.values(this.transports).some((t) => t.tasks.size > 0);
  }

  /** End every subscription without calling back, and close the connections. */
  close() {
    Object.values(this.transports).forEach((t) => t.close());
    this.frames.entries.clear();
    this.frames.stop();
    globalThis.removeEventListener?.("online", this.onOnline);
    globalThis.document?.removeEventListener?.("visibilitychange", this.onVisibility);
    this.updateConnection();
  }

  /** @internal the delay before retry number `attempt`, from this client's options */
  backoff(attempt) {
    return backoffDelay(attempt, this.options);
  }

  /** @internal tell listeners when the combined state or a transport's state changed */
  updateConnection() {
    const sse = this.transports.sse.state;
    const ws = this.transports.ws.state;
    const state = combineStates([sse, ws]);
    if (state === this.last.state && sse === this.last.sse && ws === this.last.ws) return;
    this.last = { state, sse, ws };
    for (const fn of [...this.listeners]) call(fn, state, { sse, ws });
  }
}

// ---------------------------------------------------------------------------
// The default client, for pages that need nothing more than subscribe().

let defaultClient = null;
let defaultSettings = {};

function defaultRelay() {
  defaultClient ??= new RelayClient(defaultSettings.baseUrl, withoutBaseUrl(defaultSettings));
  return defaultClient;
}

function withoutBaseUrl({ baseUrl, ...options }) {
  return options;
}

/**
 * Settings of the default client used by `subscribe()`, `onConnection()` and
 * `connectionState()`: `baseUrl` and any of `DEFAULT_OPTIONS`. Call it before
 * the first `subscribe()`; for a second relay, make a `new RelayClient()`.
 *
 * @param {{baseUrl?: string} & Partial<typeof DEFAULT_OPTIONS>} [options]
 */
export function configure(options = {}) {
  const settings = { ...defaultSettings, ...options };
  mergeOptions(withoutBaseUrl(settings)); // refuse bad options now, not at first use
  if (defaultClient?.busy) {
    throw new Error("relay-client: configure() comes before the first subscribe()");
  }
  defaultSettings = settings;
  if (!defaultClient) return;
  // Listeners already registered (a connection indicator) carry over to the new client.
  const listeners = defaultClient.listeners;
  defaultClient.close();
  defaultClient = null;
  defaultRelay().listeners = listeners;
}

/** `subscribe()` of the default client: see `RelayClient#subscribe`. */
export function subscribe(taskId, options) {
  return defaultRelay().subscribe(taskId, options);
}

/** `onConnection()` of the default client: see `RelayClient#onConnection`. */
export function onConnection(fn) {
  return defaultRelay().onConnection(fn);
}

/** `connectionState()` of the default client. */
export function connectionState() {
  return defaultRelay().connectionState();
}
