// A TypeScript app using the packed comfy-relay-client, type-checked under --strict by
// tests/test_client_package.py. Lines under `// @ts-expect-error` must be errors (tsc fails
// on a directive with no error under it), and the test checks that each is one.
// runtime-exports.ts is written by the test: the names the module really exports, in Node.

import * as client from "comfy-relay-client";
import {
  ConnectionState,
  DEFAULT_OPTIONS,
  DEFAULT_SMOOTHING,
  ProgressSmoother,
  RelayClient,
  Transport,
  applyMergePatch,
  backoffDelay,
  combineStates,
  configure,
  connectionState,
  isValidTaskId,
  mergeOptions,
  normalizeBaseUrl,
  onConnection,
  parseSeq,
  parseStreamId,
  resumePosition,
  streamUrl,
  subscribe,
  webSocketUrl,
} from "comfy-relay-client";
import type {
  ConnectionDetail,
  ConnectionSnapshot,
  EndInfo,
  ErrorCode,
  NodeState,
  RelayClientOptions,
  RelayError,
  StateInfo,
  SubscribeOptions,
  TaskState,
  TaskStatus,
  TerminalStatus,
  Unsubscribe,
} from "comfy-relay-client";
import type { RuntimeExports } from "./runtime-exports.js";

type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
type IsAny<T> = 0 extends 1 & T ? true : false;
function assertType<T extends true>(): T | void {}

// The declarations name exactly the values the module exports.
assertType<Equal<keyof typeof client, RuntimeExports>>();

// The task state, as the upstream sends it.
assertType<Equal<TaskStatus, "waiting" | "running" | "succeeded" | "failed">>();
assertType<Equal<TerminalStatus, "succeeded" | "failed">>();
assertType<Equal<TaskState["status"], TaskStatus>>();
assertType<Equal<TaskState["progress"], number | undefined>>();
assertType<Equal<TaskState["lastQueueRemaining"], number | undefined>>();
assertType<Equal<TaskState["etaRelative"], number | undefined>>();
assertType<Equal<TaskState["message"], string | undefined>>();
assertType<Equal<TaskState["state"], NodeState | undefined>>();
assertType<Equal<NodeState["nodeLabel"], string | undefined>>();
assertType<Equal<NodeState["step"], number | undefined>>();
assertType<Equal<NodeState["maxSteps"], number | undefined>>();
assertType<Equal<TaskState["someFieldTheRelayDoesNotKnow"], unknown>>();

// Callbacks and their arguments.
type Callback<K extends keyof SubscribeOptions> = NonNullable<SubscribeOptions[K]>;
assertType<Equal<Parameters<Callback<"onState">>, [state: TaskState, info: StateInfo]>>();
assertType<Equal<Parameters<Callback<"onEnd">>, [info: EndInfo]>>();
assertType<Equal<Parameters<Callback<"onError">>, [error: RelayError]>>();
assertType<Equal<Parameters<Callback<"onProgress">>, [value: number, state: TaskState]>>();
assertType<Equal<StateInfo["kind"], "snapshot" | "patch">>();
assertType<Equal<StateInfo["seq"], number | undefined>>();
assertType<Equal<EndInfo["status"], TerminalStatus>>();
assertType<Equal<EndInfo["state"], TaskState | undefined>>();
assertType<Equal<SubscribeOptions["transport"], "sse" | "ws" | undefined>>();

// Errors and their codes.
assertType<
  Equal<
    ErrorCode,
    | "invalid_task_id"
    | "task_not_found"
    | "unauthorized"
    | "upstream_unavailable"
    | "bad_request"
    | "too_many_tasks"
    | "overloaded"
    | "internal_error"
  >
>();
assertType<Equal<RelayError, { readonly taskId: string; readonly code: ErrorCode; readonly message: string; readonly retrying: boolean }>>();

// Options, with their types (not the literal defaults), and the connection states.
assertType<Equal<typeof DEFAULT_OPTIONS.maxTasksPerStream, number>>();
assertType<Equal<RelayClientOptions["sseWithCredentials"], boolean>>();
assertType<Equal<ConnectionState, "idle" | "connecting" | "open" | "reconnecting" | "down">>();
assertType<Equal<typeof ConnectionState.DOWN, "down">>();
assertType<Equal<Transport, "sse" | "ws">>();
assertType<Equal<ConnectionSnapshot, { readonly state: ConnectionState; readonly sse: ConnectionState; readonly ws: ConnectionState }>>();

// No `any` leaks out.
assertType<Equal<IsAny<ReturnType<typeof applyMergePatch>>, false>>();
assertType<Equal<IsAny<TaskState["result"]>, false>>();
assertType<Equal<IsAny<StateInfo["patch"]>, false>>();
assertType<Equal<IsAny<Parameters<typeof parseSeq>[0]>, false>>();

// A page's use of the client.
const relay = new RelayClient("https://relay.example.com/", { maxTasksPerStream: 8, backoffMaxMs: 10_000 });
const unwatch: () => void = relay.onConnection((state: ConnectionState, detail: ConnectionDetail) => {
  if (state === ConnectionState.DOWN || detail.ws === "reconnecting") console.log("reconnecting…");
});
const stop: Unsubscribe = relay.subscribe("01j5t2qx82323pswaqykz9eq4", {
  transport: Transport.WS,
  token: () => "a-jwt",
  onState(state, info) {
    const label = state.state?.nodeLabel ?? state.status;
    const steps = state.state?.step !== undefined ? `${state.state.step}/${state.state.maxSteps ?? "?"}` : "";
    if (info.kind === "patch" && info.seq !== undefined) console.log(label, steps, info.seq);
    if (state.status === "waiting") console.log("queue", state.lastQueueRemaining ?? 0);
  },
  onProgress(value, state) {
    const percent: number = Math.round(value * 100);
    console.log(`${percent}%`, state.etaRelative?.toFixed(1), state.message);
  },
  onEnd({ status, state }) {
    const images: readonly string[] = state?.result?.images ?? [];
    console.log(status === "succeeded" ? images : state?.message);
  },
  onError(error) {
    switch (error.code) {
      case "upstream_unavailable":
      case "overloaded":
        return console.log("retrying", error.retrying);
      case "task_not_found":
      case "invalid_task_id":
      case "unauthorized":
      case "bad_request":
      case "too_many_tasks":
      case "internal_error":
        return console.log(error.message);
      default: {
        const unreachable: never = error.code;
        return unreachable;
      }
    }
  },
});
stop();
unwatch();
relay.reconnectNow();
const busy: boolean = relay.busy;
const now: ConnectionSnapshot = relay.connectionState();
relay.close();

// The default client and the pure helpers.
configure({ baseUrl: "https://relay.example.com/", backoffInitialMs: 250 });
subscribe("task", { onProgress: (value) => console.log(value) })();
onConnection((state) => console.log(state))();
const current: ConnectionState = connectionState().state;
const smoother = new ProgressSmoother({ maxLead: 0.02 });
const shown: number = smoother.update({ status: "running", progress: 0.4, etaRelative: 12 }, performance.now());
const later: number = smoother.valueAt(performance.now() + 16);
const moving: boolean = smoother.moving(performance.now());
const lead: number = DEFAULT_SMOOTHING.maxLead;
const maybeId: unknown = "abc";
if (isValidTaskId(maybeId)) subscribe(maybeId, {}); // narrowed to string
const merged: unknown = applyMergePatch({ a: 1 }, { a: null });
const seq: number | undefined = parseSeq("12");
const positions: Map<string, number> = parseStreamId("A:1,B:2");
const position: string | undefined = resumePosition(["A"], positions);
const urls: string[] = [streamUrl(relay.baseUrl, ["A", "B"], { seqs: positions }), webSocketUrl(relay.baseUrl)];
const base: string = normalizeBaseUrl("/relay", "https://example.com/");
const delay: number = backoffDelay(3, DEFAULT_OPTIONS);
const worst: ConnectionState = combineStates(["open", "down"]);
const options: Readonly<RelayClientOptions> = mergeOptions({ wsIdleCloseMs: 0 });
console.log(busy, now, current, shown, later, moving, lead, merged, seq, position, urls, base, delay, worst, options);

// Lines that must be errors.
// @ts-expect-error: "http" is not a transport
relay.subscribe("task", { transport: "http" });
// @ts-expect-error: a status the upstream never sends
relay.subscribe("task", { onState: (state) => state.status === "done" });
// @ts-expect-error: a task ends only succeeded or failed
relay.subscribe("task", { onEnd: ({ status }) => status === "running" });
// @ts-expect-error: not an error code
relay.subscribe("task", { onError: (error) => error.code === "timeout" });
// @ts-expect-error: the state is read-only (its parts are shared between calls)
relay.subscribe("task", { onState: (state) => (state.progress = 1) });
// @ts-expect-error: the progress is a number
relay.subscribe("task", { onProgress: (value: string) => value });
// @ts-expect-error: a message is text
relay.subscribe("task", { onState: (state) => Math.round(state.message) });
// @ts-expect-error: a misspelt option
new RelayClient("https://relay.example.com/", { maxTaskPerStream: 8 });
// @ts-expect-error: an option of the wrong type
new RelayClient("https://relay.example.com/", { backoffMaxMs: "15s" });
// @ts-expect-error: the options are frozen
relay.options.maxTasksPerStream = 2;
// @ts-expect-error: the constants are frozen
ConnectionState.OPEN = "down";
// @ts-expect-error: not a connection state
const connected: ConnectionState = "connected";
// @ts-expect-error: a task ID is a string
relay.subscribe(42, {});
// @ts-expect-error: the transports are the client's own business
relay.transports;
// @ts-expect-error: not a smoothing setting
new ProgressSmoother({ lead: 0.1 });
// @ts-expect-error: unsubscribing returns nothing to use
const result: boolean = stop();
console.log(connected, result);
