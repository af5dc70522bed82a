// The demo page: start simulated tasks, watch task IDs, one card per task.
//
// URL parameters (handy for demos and tests):
//   transport=sse|ws   transport for new tasks
//   duration=S queue=S fail=false|some|true   simulation options (the outcome:
//                      all succeed, the default; some fail at random; all fail)
//   watch=ID[,ID...]   watch these task IDs on load
//   start=N            start N simulated tasks on load
//   token=JWT          access token for every subscription (relays with RELAY_TOKEN_SECRET)
//
// For tests: window.relayStates[taskId] holds the client's current state,
// window.relayProgress[taskId] every value onProgress gave the bar, in order,
// window.relayConnectionLog the connection states seen, in order.

import { ConnectionState, RelayClient, isValidTaskId } from "./relay-client.js";

const $ = (selector, root = document) => root.querySelector(selector);

const els = {
  connection: $("#connection"),
  connLabel: $("#connection .conn-label"),
  connDetail: $("#connection .conn-detail"),
  startButtons: [...document.querySelectorAll("[data-start]")],
  watchForm: $("#watch-form"),
  watchInput: $("#watch-id"),
  watchHint: $("#watch-hint"),
  simQueue: $("#sim-queue"),
  simDuration: $("#sim-duration"),
  simFail: $("#sim-fail"),
  notice: $("#notice"),
  summary: $("#summary"),
  clearFinished: $("#clear-finished"),
  empty: $("#empty"),
  tasks: $("#tasks"),
  announcer: $("#announcer"),
  template: $("#card-template"),
};

const STATUS_TEXT = {
  connecting: "Connecting",
  waiting: "Waiting",
  running: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  error: "Error",
};
// What a card says about an error that ends its subscription: a badge, a headline and a
// sentence for a person. The relay's own code and message go into the tooltip.
const ERROR_TEXT = {
  task_not_found: {
    badge: "Not found",
    headline: "Unknown task",
    sentence: "The upstream has no task with this ID. Check the ID, or start a new task.",
  },
  unauthorized: {
    badge: "Refused",
    headline: "Not authorized",
    sentence: "The relay refused to show this task: the page's access token does not cover it, "
      + "or the upstream refused the relay's keys.",
  },
  invalid_task_id: {
    badge: "Error",
    headline: "Not a task ID",
    sentence: "A task ID is 1 to 128 letters, digits, _ or -.",
  },
  internal_error: {
    badge: "Error",
    headline: "Relay error",
    sentence: "The relay failed while watching this task. Its log says more.",
  },
};
const OTHER_ERROR = {
  badge: "Error",
  headline: "Cannot watch this task",
  sentence: "The relay could not deliver this task's progress.",
};
// Errors the client and the relay recover from by themselves.
const RETRY_TEXT = {
  upstream_unavailable: "The upstream is not answering; retrying…",
  overloaded: "The relay is busy; retrying shortly…",
};
// The summary lists the badges in this order.
const BADGE_ORDER = ["Connecting", "Waiting", "Running", "Succeeded", "Failed", "Not found", "Refused", "Error"];
const CONNECTION_TEXT = {
  [ConnectionState.IDLE]: "Idle",
  [ConnectionState.CONNECTING]: "Connecting…",
  [ConnectionState.OPEN]: "Live",
  [ConnectionState.RECONNECTING]: "Reconnecting…",
  [ConnectionState.DOWN]: "Connection lost",
};
const PART_TEXT = {
  [ConnectionState.CONNECTING]: "connecting",
  [ConnectionState.OPEN]: "live",
  [ConnectionState.RECONNECTING]: "reconnecting",
  [ConnectionState.DOWN]: "down",
};
const WATCH_HINT = els.watchHint.innerHTML;
const TOKEN = new URLSearchParams(location.search).get("token") || undefined;
const relay = new RelayClient(); // the relay that served this page

/** taskId -> card record */
const cards = new Map();
window.relayStates = {};
window.relayProgress = {};
window.relayConnectionLog = [];

// ---------------------------------------------------------------------------
// Connection indicator

relay.onConnection((state, detail) => {
  window.relayConnectionLog.push(state);
  els.connection.dataset.state = state;
  els.connLabel.textContent = CONNECTION_TEXT[state] ?? state;
  const parts = [];
  if (detail.sse !== ConnectionState.IDLE) parts.push(`SSE ${PART_TEXT[detail.sse] ?? detail.sse}`);
  if (detail.ws !== ConnectionState.IDLE) parts.push(`WebSocket ${PART_TEXT[detail.ws] ?? detail.ws}`);
  els.connDetail.textContent = parts.length ? parts.join(" · ") : "No subscriptions";
});

// ---------------------------------------------------------------------------
// Formatting

function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

function shortId(taskId) {
  return taskId.length > 18 ? `${taskId.slice(0, 8)}…${taskId.slice(-6)}` : taskId;
}

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

// ---------------------------------------------------------------------------
// Cards

function createCard(taskId, transport) {
  const el = els.template.content.firstElementChild.cloneNode(true);
  const titleId = `task-title-${taskId}`;
  el.dataset.taskId = taskId;
  el.dataset.transport = transport;
  el.dataset.status = "connecting";
  const title = $(".task-id", el);
  title.id = titleId;
  title.textContent = shortId(taskId);
  title.title = taskId;
  $(".transport-badge", el).textContent = transport === "ws" ? "WebSocket" : "SSE";
  const bar = $(".bar", el);
  bar.setAttribute("aria-labelledby", titleId);
  bar.setAttribute("aria-valuetext", "Connecting");
  const remove = $(".remove-btn", el);
  remove.setAttribute("aria-label", `Stop watching task ${taskId}`);
  remove.title = "Stop watching and remove";
  remove.addEventListener("click", () => removeCard(taskId));
  return {
    taskId,
    transport,
    el,
    status: "connecting",
    finished: false,
    progress: 0, // the client's smoothed progress (onProgress), 0 to 1
    unsubscribe: () => {},
    parts: {
      statusText: $(".status-text", el),
      node: $(".node-label", el),
      bar,
      fill: $(".bar-fill", el),
      percent: $(".percent", el),
      step: $(".step", el),
      queue: $(".queue", el),
      eta: $(".eta", el),
      message: $(".message", el),
      warning: $(".warning", el),
      images: $(".images", el),
    },
  };
}

function show(el, text) {
  el.hidden = !text;
  el.textContent = text || "";
}

function setStatus(card, status, badge = STATUS_TEXT[status] ?? status) {
  card.status = status;
  card.el.dataset.status = status;
  card.parts.statusText.textContent = badge;
}

function renderState(card, state) {
  const { parts } = card;
  const status = typeof state.status === "string" ? state.status : "waiting";
  setStatus(card, status);
  show(parts.warning, "");

  const percent = renderProgress(card, card.progress);

  const detail = state.state && typeof state.state === "object" ? state.state : {};
  const running = status === "running";
  const waiting = status === "waiting";

  let node;
  if (waiting) node = "Waiting in the queue";
  else if (status === "succeeded") node = "Done";
  else if (status === "failed") node = detail.nodeLabel ? `Failed in ${detail.nodeLabel}` : "Failed";
  else node = detail.nodeLabel || "Starting…";
  parts.node.textContent = node;
  parts.node.title = node;

  const stepText = running && isNumber(detail.step) && isNumber(detail.maxSteps) && detail.maxSteps > 0
    ? `Node step ${detail.step} of ${detail.maxSteps}` : "";
  const queueText = waiting && isNumber(state.lastQueueRemaining)
    ? `Queue position ${state.lastQueueRemaining}` : "";
  const etaText = running && isNumber(state.etaRelative) && state.etaRelative > 0
    ? `ETA ${formatDuration(state.etaRelative)}` : "";
  show(parts.step, stepText);
  show(parts.queue, queueText);
  show(parts.eta, etaText);
  parts.message.textContent = typeof state.message === "string" ? state.message : "";
  parts.message.title = parts.message.textContent;

  const valueText = [waiting ? "Waiting" : `${percent}%`, queueText, stepText, running ? node : "", etaText]
    .filter(Boolean).join(", ");
  parts.bar.setAttribute("aria-valuetext", status === "succeeded" ? "100%, succeeded" : status === "failed" ? `${percent}%, failed` : valueText);

  renderImages(card, state.result);
}

/**
 * The bar, from the client's onProgress: a value that never goes back and moves between
 * the relay's states, so the fill is set at every animation frame (no CSS transition).
 * Returns the whole percent shown.
 */
function renderProgress(card, value) {
  const { parts } = card;
  card.progress = value;
  const percent = Math.floor(value * 100);
  parts.fill.style.width = `${(value * 100).toFixed(2)}%`;
  if (parts.percent.textContent !== `${percent}%`) {
    parts.bar.setAttribute("aria-valuenow", String(percent));
    parts.percent.textContent = `${percent}%`;
  }
  return percent;
}

function renderImages(card, result) {
  const box = card.parts.images;
  const images = Array.isArray(result?.images) ? result.images.filter((u) => typeof u === "string") : [];
  const key = images.join("\n");
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren();
  images.slice(0, 4).forEach((src, i) => {
    let href;
    try {
      href = new URL(src, location.href);
    } catch {
      return;
    }
    if (!["http:", "https:", "data:", "blob:"].includes(href.protocol)) return;
    const link = document.createElement("a");
    link.href = href.href;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    const img = document.createElement("img");
    img.src = href.href;
    img.alt = `Generated image ${i + 1} of ${images.length}`;
    img.loading = "lazy";
    img.decoding = "async";
    img.addEventListener("error", () => link.remove());
    link.append(img);
    box.append(link);
  });
  box.hidden = box.childElementCount === 0;
}

function finish(card) {
  card.finished = true;
  card.el.dataset.finished = "true";
  announce(`Task ${shortId(card.taskId)}: ${card.parts.statusText.textContent.toLowerCase()}.`);
  updateSummary();
}

function announce(text) {
  els.announcer.textContent = text;
}

function removeCard(taskId) {
  const card = cards.get(taskId);
  if (!card) return;
  card.unsubscribe();
  cards.delete(taskId);
  card.el.remove();
  updateSummary();
}

/** "6 tasks · 1 waiting · 4 running · 1 not found": the cards' badges, counted. */
function updateSummary() {
  const counts = new Map(BADGE_ORDER.map((badge) => [badge, 0]));
  for (const card of cards.values()) {
    const badge = card.parts.statusText.textContent;
    counts.set(badge, (counts.get(badge) ?? 0) + 1);
  }
  const total = cards.size;
  els.empty.hidden = total > 0;
  const finished = [...cards.values()].filter((c) => c.finished).length;
  els.clearFinished.disabled = finished === 0;
  if (!total) {
    els.summary.textContent = "";
    return;
  }
  const parts = [`${total} ${total === 1 ? "task" : "tasks"}`];
  for (const [badge, count] of counts) if (count) parts.push(`${count} ${badge.toLowerCase()}`);
  els.summary.textContent = parts.join(" · ");
}

// ---------------------------------------------------------------------------
// Watching and starting tasks

function currentTransport() {
  return document.querySelector('input[name="transport"]:checked')?.value === "ws" ? "ws" : "sse";
}

/** Watch a task; returns false when the ID is invalid. */
function watch(taskId, transport = currentTransport(), { focus = false } = {}) {
  if (!isValidTaskId(taskId)) return false;
  const existing = cards.get(taskId);
  if (existing) {
    existing.el.classList.remove("flash");
    void existing.el.offsetWidth;
    existing.el.classList.add("flash");
    return true;
  }
  const card = createCard(taskId, transport);
  cards.set(taskId, card);
  els.tasks.prepend(card.el);
  card.unsubscribe = relay.subscribe(taskId, {
    transport,
    token: TOKEN,
    onState(state) {
      window.relayStates[taskId] = state;
      renderState(card, state);
      updateSummary();
    },
    onProgress(value) {
      (window.relayProgress[taskId] ??= []).push(value);
      renderProgress(card, value);
    },
    onEnd({ status, state }) {
      if (state) renderState(card, state);
      setStatus(card, status ?? card.status);
      finish(card);
    },
    onError(err) {
      const detail = [err.code, err.message].filter(Boolean).join(": ");
      if (err.retrying) {
        show(card.parts.warning, RETRY_TEXT[err.code] ?? "Trouble reaching the task; retrying…");
        card.parts.warning.title = detail;
        return;
      }
      const { badge, headline, sentence } = ERROR_TEXT[err.code] ?? OTHER_ERROR;
      setStatus(card, "error", badge);
      card.el.dataset.errorCode = err.code ?? "error";
      card.parts.node.textContent = headline;
      card.parts.message.textContent = sentence;
      card.parts.message.title = detail;
      card.parts.bar.setAttribute("aria-valuetext", `Error: ${headline.toLowerCase()}`);
      finish(card);
    },
  });
  updateSummary();
  if (focus) card.el.querySelector(".task-id").scrollIntoView({ block: "nearest" });
  return true;
}

function simOptions() {
  const body = {};
  const queue = parseFloat(els.simQueue.value);
  const duration = parseFloat(els.simDuration.value);
  if (Number.isFinite(queue) && queue >= 0) body.queue = queue;
  if (Number.isFinite(duration) && duration > 0) body.duration = duration;
  // Tasks succeed unless the user asked for failures: a first task that fails at
  // random looks like a bug. "Some fail" leaves it to the simulator's fail rate.
  if (els.simFail.value !== "some") body.fail = els.simFail.value === "true";
  return body;
}

function showNotice(text) {
  els.notice.hidden = !text;
  els.notice.textContent = text || "";
}

async function createSimTask(body) {
  const response = await fetch("sim/tasks", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    throw new Error(response.status === 404 || response.status === 405
      ? "This relay has no embedded simulator (it runs only when no upstream is configured)."
      : `The simulator answered HTTP ${response.status}.`);
  }
  const { taskId } = await response.json();
  return taskId;
}

async function startTasks(count) {
  const body = simOptions();
  const transport = currentTransport();
  els.startButtons.forEach((b) => (b.disabled = true));
  showNotice("");
  try {
    const results = await Promise.allSettled(Array.from({ length: count }, () => createSimTask(body)));
    // Subscribe to the whole batch at once: SSE then opens one multiplexed stream.
    const ids = results.filter((r) => r.status === "fulfilled").map((r) => r.value);
    for (const id of ids.reverse()) watch(id, transport);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) showNotice(`Could not start ${results.length - ids.length} of ${count} tasks: ${failed.reason.message}`);
  } finally {
    els.startButtons.forEach((b) => (b.disabled = false));
  }
}

// ---------------------------------------------------------------------------
// Wiring

els.startButtons.forEach((button) => {
  button.addEventListener("click", () => startTasks(Number(button.dataset.start)));
});

els.watchForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const taskId = els.watchInput.value.trim();
  if (!isValidTaskId(taskId)) {
    els.watchInput.setAttribute("aria-invalid", "true");
    els.watchHint.classList.add("hint-error");
    els.watchHint.textContent = "Not a task ID: use 1 to 128 letters, digits, _ or -.";
    els.watchInput.focus();
    return;
  }
  els.watchInput.removeAttribute("aria-invalid");
  els.watchHint.classList.remove("hint-error");
  els.watchHint.innerHTML = WATCH_HINT;
  watch(taskId, currentTransport(), { focus: true });
  els.watchInput.value = "";
});

els.watchInput.addEventListener("input", () => {
  if (els.watchInput.getAttribute("aria-invalid") !== "true") return;
  els.watchInput.removeAttribute("aria-invalid");
  els.watchHint.classList.remove("hint-error");
  els.watchHint.innerHTML = WATCH_HINT;
});

els.clearFinished.addEventListener("click", () => {
  for (const card of [...cards.values()]) if (card.finished) removeCard(card.taskId);
});

function applyUrlParameters() {
  const params = new URLSearchParams(location.search);
  const transport = params.get("transport");
  if (transport === "ws" || transport === "sse") $(`#transport-${transport}`).checked = true;
  if (params.has("queue")) els.simQueue.value = params.get("queue");
  if (params.has("duration")) els.simDuration.value = params.get("duration");
  const fail = params.get("fail");
  if (fail === "true" || fail === "1") els.simFail.value = "true";
  if (fail === "false" || fail === "0") els.simFail.value = "false";
  if (fail === "some") els.simFail.value = "some";
  for (const id of params.getAll("watch").flatMap((v) => v.split(","))) watch(id.trim());
  const start = Number(params.get("start"));
  if (Number.isInteger(start) && start > 0) startTasks(Math.min(start, 32));
}

// The Start buttons and simulation options work only on a relay with its embedded simulator:
// a relay with a real upstream answers 404 for the simulator's routes, and they are hidden.
async function showSimulatorControls() {
  let simulator = true;
  try {
    simulator = (await fetch("sim/stats", { cache: "no-store" })).status !== 404;
  } catch {
    return; // the relay cannot be reached: the connection indicator says so
  }
  for (const el of document.querySelectorAll("[data-needs-simulator]")) el.hidden = !simulator;
  for (const el of document.querySelectorAll("[data-without-simulator]")) el.hidden = simulator;
  document.documentElement.dataset.simulator = simulator ? "on" : "off";
}

applyUrlParameters();
updateSummary();
showSimulatorControls();
document.documentElement.dataset.ready = "true";
