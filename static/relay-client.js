/**
 * relay-client.js: browser client for comfy-relay.
 *
 * An ES module with no dependencies and no build step:
 *
 *     import { subscribe, onConnection } from "/static/relay-client.js";
 *     const stop = subscribe(taskId, {
 *       transport: "sse",                      // or "ws"
 *       onState: (state) => render(state),     // always the whole current state
 *       onEnd: ({ status }) => done(status),   // "succeeded" | "failed"
 *       onError: (err) => warn(err),           // {code, message, retrying}
 *     });
 *
 * The relay sends a full state first ("snapshot") and then JSON Merge Patches
 * (RFC 7396); this module applies them and hands out whole states.
 *
 * - WebSocket: one shared socket per page for every "ws" subscription. It
 *   reconnects with capped exponential backoff and jitter, and resubscribes
 *   every live task with the last sequence number it saw.
 * - Server-Sent Events: one task uses `/v1/tasks/{id}/events`; several tasks
 *   share one multiplexed `/v1/events?taskId=...` stream (browsers allow only
 *   six HTTP/1.1 connections per origin). The stream is re-opened with the new
 *   list when tasks are added or dropped (re-opened streams start with a fresh
 *   snapshot), and closed once all of its tasks ended.
 *
 * By default the relay is the server this file was loaded from (the folder
 * above `/static/`); call `configure({ baseUrl })` to point elsewhere.
 *
 * @module relay-client
 */

const TASK_ID_RE = /^[A-Za-z0-9_-]{1,128}$/;
const TERMINAL_STATUSES = new Set(["succeeded", "failed"]);

const config = {
  baseUrl: defaultBaseUrl(),
  maxTasksPerStream: 32,
  backoffInitialMs: 500,
  backoffMaxMs: 15000,
  wsIdleCloseMs: 1000,
  sseWithCredentials: false,
};

function defaultBaseUrl() {
  try {
    return new URL("../", import.meta.url).href;
  } catch {
    return globalThis.location ? new URL("/", globalThis.location.href).href : "/";
  }
}

/**
 * Change client settings. Call before the first `subscribe()`.
 *
 * @param {object} options
 * @param {string} [options.baseUrl] Relay base URL, e.g. "https://relay.example.com/"
 *   (default: the folder above the `/static/` this module was served from).
 * @param {number} [options.maxTasksPerStream=32] Tasks per multiplexed SSE stream
 *   (the relay's cap); more tasks are spread over several streams.
 * @param {number} [options.backoffInitialMs=500] First reconnect delay.
 * @param {number} [options.backoffMaxMs=15000] Longest reconnect delay.
 * @param {boolean} [options.sseWithCredentials=false] Send cookies on cross-origin SSE.
 */
export function configure(options = {}) {
  for (const [key, value] of Object.entries(options)) {
    if (!(key in config)) throw new TypeError(`relay-client: unknown option ${key}`);
    config[key] = value;
  }
  if (!config.baseUrl.endsWith("/")) config.baseUrl += "/";
}

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

function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

function call(fn, ...args) {
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (error) {
    report(error);
  }
}

function backoffDelay(attempt) {
  const ceiling = Math.min(config.backoffMaxMs, config.backoffInitialMs * 2 ** Math.min(attempt, 16));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

function url(path) {
  return new URL(path, config.baseUrl);
}

// ---------------------------------------------------------------------------
// One task as seen by this page on one transport, shared by all subscribe()
// calls for it.

class TaskEntry {
  constructor(taskId, transport, token) {
    this.taskId = taskId;
    this.transport = transport;
    this.token = token; // string, or a function returning one, or undefined
    this.state = undefined;
    this.seq = undefined;
    this.handlers = new Set();
    this.attempts = 0; // WebSocket: resubscriptions after "overloaded"
    this.retryTimer = null;
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
  }

  end(status) {
    const info = { taskId: this.taskId, status: status ?? this.state?.status, state: this.state };
    for (const h of [...this.handlers]) call(h.onEnd, info);
  }

  error(err) {
    const info = { retrying: false, ...err, taskId: this.taskId };
    for (const h of [...this.handlers]) call(h.onError, info);
  }

  isTerminal() {
    return TERMINAL_STATUSES.has(this.state?.status);
  }
}

function parseSeq(value) {
  if (value === undefined || value === null || value === "") return undefined;
  const n = Number(value);
  return Number.isFinite(n) ? n : undefined;
}

// ---------------------------------------------------------------------------
// Connection state, aggregated over both transports.

const connectionListeners = new Set();
let lastConnection = { state: "idle", sse: "idle", ws: "idle" };

function computeConnection() {
  const parts = { sse: sseState(), ws: ws.state };
  const active = Object.values(parts).filter((s) => s !== "idle");
  let state = "idle";
  if (active.length) {
    state = ["down", "reconnecting", "connecting"].find((s) => active.includes(s)) ?? "open";
  }
  return { state, ...parts };
}

function updateConnection() {
  const next = computeConnection();
  if (next.state === lastConnection.state && next.sse === lastConnection.sse && next.ws === lastConnection.ws) return;
  lastConnection = next;
  for (const fn of [...connectionListeners]) call(fn, next.state, { sse: next.sse, ws: next.ws });
}

/**
 * Listen to the page's connection to the relay. `fn(state, detail)` is called
 * at once with the current state and again on every change. `state` is
 * "idle" (nothing subscribed), "connecting", "open", "down" (lost, waiting to
 * retry) or "reconnecting"; `detail` has the same for each transport:
 * `{sse, ws}`.
 *
 * @param {(state: string, detail: {sse: string, ws: string}) => void} fn
 * @returns {() => void} removes the listener
 */
export function onConnection(fn) {
  connectionListeners.add(fn);
  call(fn, lastConnection.state, { sse: lastConnection.sse, ws: lastConnection.ws });
  return () => connectionListeners.delete(fn);
}

/**
 * The current connection state, as passed to `onConnection` listeners.
 *
 * @returns {{state: string, sse: string, ws: string}}
 */
export function connectionState() {
  return { ...lastConnection };
}

// ---------------------------------------------------------------------------
// WebSocket: one socket for all "ws" subscriptions.

const ws = {
  socket: null,
  tasks: new Map(),
  state: "idle",
  attempts: 0,
  recovering: false, // lost the connection, not yet back
  retryTimer: null,
  idleTimer: null,
};

function wsUrl() {
  const u = url("v1/ws");
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u.href;
}

function wsSend(message) {
  if (ws.socket && ws.socket.readyState === WebSocket.OPEN) {
    ws.socket.send(JSON.stringify(message));
    return true;
  }
  return false;
}

function wsSubscribeMessage(entry) {
  const message = { type: "subscribe", taskId: entry.taskId };
  if (entry.seq !== undefined) message.lastSeq = entry.seq;
  const token = entry.currentToken();
  if (token !== undefined) message.token = token;
  return message;
}

function wsConnect() {
  ws.retryTimer = null;
  if (ws.socket || ws.tasks.size === 0) return;
  let socket;
  try {
    socket = new WebSocket(wsUrl());
  } catch (error) {
    report(error);
    wsScheduleReconnect();
    return;
  }
  ws.socket = socket;
  ws.state = ws.recovering ? "reconnecting" : "connecting";
  updateConnection();

  socket.onopen = () => {
    if (ws.socket !== socket) return;
    ws.recovering = false;
    ws.state = "open";
    for (const entry of ws.tasks.values()) wsSend(wsSubscribeMessage(entry));
    updateConnection();
  };
  socket.onmessage = (event) => {
    if (ws.socket !== socket) return;
    ws.attempts = 0; // the relay talks to us: the next outage starts over
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    wsHandle(message);
  };
  socket.onclose = () => {
    if (ws.socket !== socket) return;
    ws.socket = null;
    if (ws.tasks.size === 0) {
      ws.state = "idle";
      updateConnection();
      return;
    }
    wsScheduleReconnect();
  };
  socket.onerror = () => {}; // a close event follows
}

function wsScheduleReconnect() {
  ws.state = "down";
  ws.recovering = true;
  const delay = backoffDelay(ws.attempts++);
  clearTimeout(ws.retryTimer);
  ws.retryTimer = setTimeout(wsConnect, delay);
  updateConnection();
}

function wsHandle(message) {
  if (!message || typeof message !== "object") return;
  const entry = message.taskId !== undefined ? ws.tasks.get(message.taskId) : undefined;
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
        wsSend({ type: "unsubscribe", taskId: entry.taskId });
        wsSend(wsSubscribeMessage(entry));
      } else {
        entry.patch(message.data, seq);
      }
      break;
    case "end":
      ws.tasks.delete(entry.taskId);
      clearTimeout(entry.retryTimer);
      entry.end(message.data?.status);
      wsMaybeIdle();
      break;
    case "error": {
      const err = message.data ?? {};
      if (err.retrying === true) {
        // "overloaded" refused the subscription: ask again later. Other retrying
        // errors (upstream_unavailable) are retried by the relay itself.
        if (err.code === "overloaded") wsResubscribeLater(entry);
        entry.error(err);
      } else {
        ws.tasks.delete(entry.taskId);
        clearTimeout(entry.retryTimer);
        entry.error(err);
        wsMaybeIdle();
      }
      break;
    }
    default:
      break;
  }
}

function wsResubscribeLater(entry) {
  clearTimeout(entry.retryTimer);
  entry.retryTimer = setTimeout(() => {
    entry.retryTimer = null;
    if (ws.tasks.get(entry.taskId) === entry) wsSend(wsSubscribeMessage(entry));
  }, backoffDelay(entry.attempts++));
}

function wsAdd(entry) {
  ws.tasks.set(entry.taskId, entry);
  clearTimeout(ws.idleTimer);
  ws.idleTimer = null;
  if (ws.socket) wsSend(wsSubscribeMessage(entry)); // sent on open otherwise
  else if (!ws.retryTimer) wsConnect();
}

function wsRemove(taskId) {
  const entry = ws.tasks.get(taskId);
  if (!entry) return;
  ws.tasks.delete(taskId);
  clearTimeout(entry.retryTimer);
  wsSend({ type: "unsubscribe", taskId });
  wsMaybeIdle();
}

function wsMaybeIdle() {
  if (ws.tasks.size > 0) return;
  clearTimeout(ws.retryTimer);
  ws.retryTimer = null;
  ws.attempts = 0;
  ws.recovering = false;
  clearTimeout(ws.idleTimer);
  ws.idleTimer = setTimeout(() => {
    ws.idleTimer = null;
    if (ws.tasks.size > 0) return;
    const socket = ws.socket;
    ws.socket = null;
    if (socket) socket.close(1000, "no subscriptions");
    ws.state = "idle";
    updateConnection();
  }, config.wsIdleCloseMs);
  if (!ws.socket) {
    ws.state = "idle";
    updateConnection();
  }
}

// ---------------------------------------------------------------------------
// Server-Sent Events: one stream for one task, one multiplexed stream for many.

const sse = {
  tasks: new Map(), // live "sse" subscriptions
  streams: new Set(),
  attempts: 0,
  retryTimer: null, // waiting out a backoff
  probing: false, // asking the relay why it refused a stream
  reconcileQueued: false,
  recovering: false, // a stream failed, not yet back
};

function sseState() {
  if (sse.retryTimer || sse.probing) return "down";
  if (sse.streams.size === 0) return sse.tasks.size ? "connecting" : "idle";
  const states = [...sse.streams].map((s) => s.state);
  return ["down", "reconnecting", "connecting"].find((s) => states.includes(s)) ?? "open";
}

function sseScheduleReconcile() {
  if (sse.reconcileQueued) return;
  sse.reconcileQueued = true;
  // A macrotask, so that a page subscribing to many tasks in one go opens one stream.
  setTimeout(() => {
    sse.reconcileQueued = false;
    sseReconcile();
  }, 0);
}

/** Open, re-open or close streams so that every live task is on exactly one. */
function sseReconcile() {
  if (sse.retryTimer || sse.probing) return; // it reconciles when done
  let covered = 0;
  let rebuild = false;
  for (const stream of sse.streams) {
    if (stream.live.size === 0) sseCloseStream(stream);
    else if (stream.stale) rebuild = true;
    else covered += stream.live.size;
  }
  if (covered !== sse.tasks.size) rebuild = true;
  if (rebuild) {
    for (const stream of sse.streams) sseCloseStream(stream);
    // A stream carries one token: tasks are grouped by token, then chunked.
    const groups = new Map();
    for (const entry of sse.tasks.values()) {
      const token = entry.currentToken();
      if (!groups.has(token)) groups.set(token, []);
      groups.get(token).push(entry.taskId);
    }
    const size = Math.max(1, config.maxTasksPerStream);
    for (const [token, ids] of groups) {
      for (let i = 0; i < ids.length; i += size) sseOpenStream(ids.slice(i, i + size), token);
    }
  }
  updateConnection();
}

function sseUrl(ids, token) {
  let target;
  if (ids.length === 1) {
    target = url(`v1/tasks/${encodeURIComponent(ids[0])}/events`);
  } else {
    target = url("v1/events");
    for (const id of ids) target.searchParams.append("taskId", id);
  }
  if (token !== undefined) target.searchParams.set("token", token);
  // A new EventSource sends no Last-Event-ID: say where each task stands, so the relay
  // sends patches for the tasks this page already holds instead of fresh snapshots.
  const held = ids.map((id) => [id, sse.tasks.get(id)?.seq]).filter(([, seq]) => seq !== undefined);
  if (held.length) {
    const position = ids.length === 1 ? String(held[0][1]) : held.map(([id, seq]) => `${id}:${seq}`).join(",");
    target.searchParams.set("lastEventId", position);
  }
  return target.href;
}

function sseOpenStream(ids, token) {
  const single = ids.length === 1;
  const es = new EventSource(sseUrl(ids, token), { withCredentials: config.sseWithCredentials });
  const stream = {
    es,
    ids,
    token,
    live: new Set(ids),
    stale: false,
    state: sse.recovering ? "reconnecting" : "connecting",
  };
  sse.streams.add(stream);

  const taskOf = (event) => {
    let payload;
    try {
      payload = JSON.parse(event.data);
    } catch {
      return {}; // not JSON: matches no task
    }
    let taskId;
    let data;
    let seq;
    if (single) {
      taskId = ids[0];
      data = payload;
      seq = parseSeq(event.lastEventId);
    } else {
      taskId = payload?.taskId;
      data = payload?.data;
      // id is "A:12,B:40": every task's current seq
      for (const part of (event.lastEventId || "").split(",")) {
        const at = part.lastIndexOf(":");
        if (at > 0 && part.slice(0, at) === taskId) seq = parseSeq(part.slice(at + 1));
      }
    }
    return { taskId, data, seq };
  };
  const entryFor = (taskId) => (stream.live.has(taskId) ? sse.tasks.get(taskId) : undefined);

  es.onopen = () => {
    if (!sse.streams.has(stream)) return;
    stream.state = "open";
    sse.recovering = false;
    sse.attempts = 0;
    updateConnection();
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
      sseScheduleReconcile();
      return;
    }
    entry.patch(data, seq);
  });
  es.addEventListener("end", (event) => {
    const { taskId, data } = taskOf(event);
    const entry = entryFor(taskId);
    if (!entry) return;
    sseFinish(stream, entry);
    entry.end(data?.status);
  });
  es.addEventListener("error", (event) => {
    if (!sse.streams.has(stream)) return;
    if (typeof event.data === "string") {
      // an "error" event sent by the relay
      const { taskId, data } = taskOf(event);
      const err = data ?? {};
      const targets = taskId !== undefined ? [entryFor(taskId)] : [...stream.live].map(entryFor);
      for (const entry of targets) {
        if (!entry) continue;
        if (err.retrying !== true) sseFinish(stream, entry);
        entry.error(err);
      }
      return;
    }
    // the connection failed
    if (es.readyState === EventSource.CLOSED) sseStreamClosed(stream);
    else stream.state = "reconnecting"; // the browser retries by itself
    updateConnection();
  });
  return stream;
}

/** The task is over on this stream: forget it, close the stream if it was the last. */
function sseFinish(stream, entry) {
  stream.live.delete(entry.taskId);
  if (sse.tasks.get(entry.taskId) === entry) sse.tasks.delete(entry.taskId);
  if (stream.live.size === 0) sseCloseStream(stream);
  updateConnection();
}

function sseCloseStream(stream) {
  stream.es.close();
  sse.streams.delete(stream);
}

/**
 * The browser gave up on a stream: the relay answered something other than an
 * event stream (the 204 for tasks that already ended, a 4xx, a 503), or the
 * browser deems the failure final. EventSource does not say which, so ask the
 * same URL once and act on the status: tasks whose last state is terminal are
 * over, a 4xx is a final error, anything else is retried after a backoff.
 */
function sseStreamClosed(stream) {
  sseCloseStream(stream);
  for (const taskId of [...stream.live]) {
    const entry = sse.tasks.get(taskId);
    if (entry && entry.isTerminal()) {
      sseFinish(stream, entry);
      entry.end(entry.state.status);
    }
  }
  if (stream.live.size === 0) return;
  sse.recovering = true;
  clearTimeout(sse.retryTimer);
  sse.retryTimer = null;
  sse.probing = true;
  const ids = [...stream.live];
  sseProbe(sseUrl(ids, stream.token)).then(({ status, body, retryAfter }) => {
    sse.probing = false;
    const entries = ids.map((id) => sse.tasks.get(id)).filter(Boolean);
    const code = typeof body?.code === "string" ? body.code : undefined;
    if (status === 400 && code === "too_many_tasks" && ids.length > 1) {
      // the relay's cap is lower than ours: use smaller streams
      config.maxTasksPerStream = Math.max(1, Math.floor(ids.length / 2));
      sseReconcile();
      return;
    }
    if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
      const err = {
        code: code ?? (status === 401 || status === 403 ? "unauthorized" : "bad_request"),
        message: typeof body?.message === "string" ? body.message : `the relay answered HTTP ${status}`,
        retrying: false,
      };
      for (const entry of entries) {
        sse.tasks.delete(entry.taskId);
        entry.error(err);
      }
      sseReconcile();
      return;
    }
    if (status === 429 || status === 503) {
      const err = { code: code ?? "overloaded", message: body?.message ?? `HTTP ${status}`, retrying: true };
      for (const entry of entries) entry.error(err);
    }
    if (sse.tasks.size === 0) {
      updateConnection();
      return;
    }
    const delay = Math.max(backoffDelay(sse.attempts++), retryAfter * 1000);
    clearTimeout(sse.retryTimer);
    sse.retryTimer = setTimeout(() => {
      sse.retryTimer = null;
      sseReconcile();
    }, Math.min(delay, config.backoffMaxMs * 4));
    updateConnection();
  });
}

/** GET a stream URL just for its status (and error body); 0 when unreachable. */
async function sseProbe(target) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 10000);
  try {
    const response = await fetch(target, {
      signal: controller.signal,
      headers: { accept: "text/event-stream" },
      cache: "no-store",
      credentials: config.sseWithCredentials ? "include" : "same-origin",
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

function sseAdd(entry) {
  sse.tasks.set(entry.taskId, entry);
  sseScheduleReconcile();
}

function sseRemove(taskId) {
  if (!sse.tasks.delete(taskId)) return;
  for (const stream of sse.streams) {
    if (!stream.live.delete(taskId)) continue;
    if (stream.live.size === 0) sseCloseStream(stream);
    else stream.stale = true; // lets the relay drop the task's poll loop
  }
  if (sse.tasks.size === 0) {
    clearTimeout(sse.retryTimer);
    sse.retryTimer = null;
    sse.attempts = 0;
    sse.recovering = false;
  }
  sseScheduleReconcile();
}

// ---------------------------------------------------------------------------

if (typeof globalThis.addEventListener === "function") {
  // Back online: retry now instead of waiting out the backoff.
  globalThis.addEventListener("online", () => {
    if (ws.retryTimer) {
      clearTimeout(ws.retryTimer);
      wsConnect();
    }
    if (sse.retryTimer) {
      clearTimeout(sse.retryTimer);
      sse.retryTimer = null;
      sseReconcile();
    }
  });
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
 * @param {"sse"|"ws"} [options.transport="sse"] Server-Sent Events or the shared WebSocket.
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
 * @returns {() => void} unsubscribe (safe to call more than once, or after the end)
 */
export function subscribe(taskId, options = {}) {
  const { transport = "sse", token, onState, onEnd, onError } = options;
  if (transport !== "sse" && transport !== "ws") {
    throw new TypeError(`relay-client: transport must be "sse" or "ws", not ${JSON.stringify(transport)}`);
  }
  const handler = { onState, onEnd, onError };
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
  const registry = transport === "ws" ? ws.tasks : sse.tasks;
  let entry = registry.get(taskId);
  if (entry) {
    entry.handlers.add(handler);
    if (entry.token === undefined) entry.token = token;
    if (entry.state !== undefined) {
      queueMicrotask(() => {
        if (entry.handlers.has(handler) && entry.state !== undefined) {
          call(onState, entry.state, { taskId, seq: entry.seq, kind: "snapshot", patch: undefined });
        }
      });
    }
  } else {
    entry = new TaskEntry(taskId, transport, token);
    entry.handlers.add(handler);
    if (transport === "ws") wsAdd(entry);
    else sseAdd(entry);
  }
  updateConnection();

  let active = true;
  return function unsubscribe() {
    if (!active) return;
    active = false;
    entry.handlers.delete(handler);
    if (entry.handlers.size > 0 || registry.get(taskId) !== entry) return;
    if (transport === "ws") wsRemove(taskId);
    else sseRemove(taskId);
    updateConnection();
  };
}
