/**
 * Type declarations of relay-client.js, comfy-relay's browser client (npm: comfy-relay-client).
 *
 * Written by hand to say exactly what the module does; tests/test_client_package.py packs the
 * package, type-checks a consumer against it under `--strict`, and checks that the module
 * exports exactly the values declared here.
 *
 * @module comfy-relay-client
 */

// ---------------------------------------------------------------------------
// What the relay sends

/** A task's status: `waiting` and `running` while it lives, `succeeded` and `failed` when over. */
export type TaskStatus = "waiting" | "running" | "succeeded" | "failed";

/** The two statuses that end a task. */
export type TerminalStatus = "succeeded" | "failed";

/** What the running node is doing: `state` in a task's state. */
export interface NodeState {
  /** the type of the node that is running, e.g. `"KSampler"` */
  readonly nodeLabel?: string;
  /** the node's current iteration step */
  readonly step?: number;
  /** the node's number of steps: a new node starts again from 1 */
  readonly maxSteps?: number;
  /** fields the upstream adds are passed on as they are */
  readonly [field: string]: unknown;
}

/** What the upstream's `comfy_get_result` answered, added to the final state of a success. */
export interface TaskResult {
  /** the generated images' URLs */
  readonly images?: readonly string[];
  /** the workflow's output */
  readonly result?: unknown;
  readonly [field: string]: unknown;
}

/**
 * A task's state: the upstream's `data` object, with `null` members dropped. Unchanged parts
 * are shared between the states a subscription hands out, hence read-only.
 */
export interface TaskState {
  readonly taskId?: string;
  readonly status: TaskStatus;
  /** the whole task's progress, 0 to 1, as the upstream reported it (it may go down) */
  readonly progress?: number;
  /** the place in the upstream's queue, while `waiting` */
  readonly lastQueueRemaining?: number;
  /** the upstream's estimate of the seconds left */
  readonly etaRelative?: number;
  /** e.g. `"Executing node KSampler"` */
  readonly message?: string;
  readonly state?: NodeState;
  /** on a success, unless the relay could not fetch it or was told not to */
  readonly result?: TaskResult;
  /** fields the relay does not know are passed on as they are */
  readonly [field: string]: unknown;
}

/** Every error's code: the contract's four, and the relay's own four. */
export type ErrorCode =
  | "invalid_task_id"
  | "task_not_found"
  | "unauthorized"
  | "upstream_unavailable"
  | "bad_request"
  | "too_many_tasks"
  | "overloaded"
  | "internal_error";

/**
 * An error about one subscription. With `retrying: true` (`upstream_unavailable`,
 * `overloaded`) the subscription goes on; otherwise it is over, and `onEnd` is not called.
 */
export interface RelayError {
  readonly taskId: string;
  readonly code: ErrorCode;
  /** for a person, in English */
  readonly message: string;
  readonly retrying: boolean;
}

// ---------------------------------------------------------------------------
// Subscribing

/** The two ways to reach the relay. */
export declare const Transport: Readonly<{ SSE: "sse"; WS: "ws" }>;
/** `"sse"` (Server-Sent Events) or `"ws"` (the client's one WebSocket). */
export type Transport = (typeof Transport)[keyof typeof Transport];

/** What came with a state: its sequence number, and whether it was a snapshot or a patch. */
export interface StateInfo {
  readonly taskId: string;
  /** the state's sequence number, once the relay has given one */
  readonly seq: number | undefined;
  readonly kind: "snapshot" | "patch";
  /** the JSON Merge Patch that made this state, for `kind: "patch"` */
  readonly patch: { readonly [field: string]: unknown } | undefined;
}

/** How a task ended. */
export interface EndInfo {
  readonly taskId: string;
  readonly status: TerminalStatus;
  /** the final state; undefined only when the relay ended the task before sending any */
  readonly state: TaskState | undefined;
}

/** An access token, or a function called at every (re)subscription for a fresh one. */
export type TokenSource = string | (() => string | undefined);

export interface SubscribeOptions {
  /** default `"sse"` */
  transport?: Transport;
  /**
   * Access token, when the relay requires them. SSE tasks with the same token share a
   * stream: mint one token for all the tasks a page shows.
   */
  token?: TokenSource;
  /** the whole current state, after every snapshot and patch */
  onState?: (state: TaskState, info: StateInfo) => void;
  /** once, when the task reached a terminal status: the subscription is over */
  onEnd?: (info: EndInfo) => void;
  /** relay errors; one with `retrying: false` ends the subscription */
  onError?: (error: RelayError) => void;
  /**
   * The task's overall progress for a progress bar, in [0, 1]: it never decreases, moves
   * between the relay's states toward where the upstream's ETA says the task will be (in
   * animation frames while the page is visible), and is exactly 1 when the task succeeded.
   * Called only when the value changed; `state` is the current state.
   */
  onProgress?: (value: number, state: TaskState) => void;
}

/** Ends a subscription; safe to call more than once, or after the end. */
export type Unsubscribe = () => void;

// ---------------------------------------------------------------------------
// Connections

/** Connection states, for the whole client and for each transport. */
export declare const ConnectionState: Readonly<{
  /** nothing subscribed */
  IDLE: "idle";
  /** opening a first connection */
  CONNECTING: "connecting";
  /** connected: updates flow */
  OPEN: "open";
  /** lost, trying again at once */
  RECONNECTING: "reconnecting";
  /** lost, waiting out a backoff before trying again */
  DOWN: "down";
}>;
export type ConnectionState = (typeof ConnectionState)[keyof typeof ConnectionState];

/** Each transport's state; one with no subscription is `idle`, whatever it keeps open. */
export interface ConnectionDetail {
  readonly sse: ConnectionState;
  readonly ws: ConnectionState;
}

/** The combined state (the worst among the transports in use) and each transport's. */
export interface ConnectionSnapshot extends ConnectionDetail {
  readonly state: ConnectionState;
}

export type ConnectionListener = (state: ConnectionState, detail: ConnectionDetail) => void;

// ---------------------------------------------------------------------------
// Clients

/** A client's settings. */
export interface RelayClientOptions {
  /** tasks per multiplexed SSE stream (the relay's default cap); more use several streams */
  maxTasksPerStream: number;
  /** first reconnect delay, doubled per failure up to `backoffMaxMs`, with jitter */
  backoffInitialMs: number;
  backoffMaxMs: number;
  /** how long an unused WebSocket stays open, in case a subscription follows */
  wsIdleCloseMs: number;
  /** send cookies on cross-origin SSE */
  sseWithCredentials: boolean;
}

export declare const DEFAULT_OPTIONS: Readonly<RelayClientOptions>;

/** The default client's settings: its relay, and any of the options. */
export interface ConfigureOptions extends Partial<RelayClientOptions> {
  baseUrl?: string;
}

/**
 * A connection to one relay: its subscriptions over both transports, and the state of its
 * connections. Make one per relay URL and share it.
 */
export declare class RelayClient {
  /**
   * @param baseUrl the relay, e.g. `"https://relay.example.com/"` (default: the folder above
   *   the `/static/` this module was served from)
   * @param options copied: later changes to the object do nothing
   * @throws TypeError on an unknown option or one of the wrong type
   */
  constructor(baseUrl?: string, options?: Partial<RelayClientOptions>);
  /** the relay's absolute URL, ending in "/" */
  readonly baseUrl: string;
  readonly options: Readonly<RelayClientOptions>;
  /** whether any task is subscribed */
  readonly busy: boolean;
  /**
   * Subscribe to a task's progress. Subscribing twice to the same task on the same transport
   * shares one subscription; a late subscriber gets the current state at once. An invalid
   * task ID calls `onError` with `invalid_task_id` and subscribes to nothing.
   *
   * @throws TypeError when `transport` is neither `"sse"` nor `"ws"`
   */
  subscribe(taskId: string, options?: SubscribeOptions): Unsubscribe;
  /** Called at once with the current state, and again at every change. */
  onConnection(listener: ConnectionListener): () => void;
  connectionState(): ConnectionSnapshot;
  /**
   * Reconnect at once whatever is down (waiting out a backoff, or left to the browser's own
   * EventSource retry). The client does it by itself when the browser goes back online and
   * when a hidden page is shown again.
   */
  reconnectNow(): void;
  /** End every subscription without calling back, and close the connections. */
  close(): void;
}

/** `subscribe()` of the default client, for the relay this file was loaded from. */
export declare function subscribe(taskId: string, options?: SubscribeOptions): Unsubscribe;
/** `onConnection()` of the default client. */
export declare function onConnection(listener: ConnectionListener): () => void;
/** `connectionState()` of the default client. */
export declare function connectionState(): ConnectionSnapshot;
/**
 * The default client's settings, before its first `subscribe()`.
 *
 * @throws TypeError on an unknown option or one of the wrong type
 * @throws Error after the default client's first subscription
 */
export declare function configure(options?: ConfigureOptions): void;

// ---------------------------------------------------------------------------
// The smoothed progress

/** A `ProgressSmoother`'s settings. */
export interface SmoothingOptions {
  /** the furthest the value runs ahead of the progress the upstream last reported */
  maxLead: number;
  /** how long after a report the value keeps moving on the ETA alone, in ms */
  horizonMs: number;
  /** time constant of the catch-up when a report is ahead of the value, in ms */
  catchUpMs: number;
  /** the highest value reached on the ETA alone: only a success makes it 1 */
  ceiling: number;
}

export declare const DEFAULT_SMOOTHING: Readonly<SmoothingOptions>;

/** What a `ProgressSmoother` reads from a state; a `TaskState` will do. */
export interface ProgressReport {
  readonly status?: string;
  readonly progress?: number;
  readonly etaRelative?: number;
}

/**
 * A task's overall progress for a progress bar, from the states the relay sends: in [0, 1],
 * never decreasing, moving between reports toward where the ETA says the task will be (at
 * most `maxLead` ahead of the last report), exactly 1 once the task succeeded. Pure: the
 * caller gives the time, in ms from any one clock (e.g. `performance.now()`).
 */
export declare class ProgressSmoother {
  /** @throws TypeError on an unknown setting or one that is not a number, 0 or more */
  constructor(options?: Partial<SmoothingOptions>);
  readonly options: Readonly<SmoothingOptions>;
  /** the last value handed out */
  readonly value: number;
  /** Take a state received at `now`; returns the value at `now`. */
  update(state: ProgressReport, now: number): number;
  /** The value to show at `now`, never lower than any handed out before. */
  valueAt(now: number): number;
  /** Whether the value would still change without another update. */
  moving(now: number): boolean;
}

// ---------------------------------------------------------------------------
// Pure helpers (no DOM, no network)

/** Whether a value is a valid task ID: 1 to 128 of `[A-Za-z0-9_-]`. */
export declare function isValidTaskId(taskId: unknown): taskId is string;
/** RFC 7396: the target with the patch applied; the target is not modified. */
export declare function applyMergePatch(target: unknown, patch: unknown): unknown;
/** A sequence number from an event id or a message's `seq`; undefined when there is none. */
export declare function parseSeq(value: unknown): number | undefined;
/** The positions in a multiplexed stream's event id (`"A:12,B:40"`), by task ID. */
export declare function parseStreamId(id: string | null | undefined): Map<string, number>;
/** Where a new stream for `ids` resumes, as its `lastEventId` parameter. */
export declare function resumePosition(
  ids: readonly string[],
  seqs: ReadonlyMap<string, number | undefined>,
): string | undefined;
/** The URL of an SSE stream for one task or several. */
export declare function streamUrl(
  baseUrl: string,
  ids: readonly string[],
  options?: { token?: string; seqs?: ReadonlyMap<string, number | undefined> },
): string;
/** The relay's WebSocket URL: `ws:` for `http:`, `wss:` for `https:`. */
export declare function webSocketUrl(baseUrl: string): string;
/** A base URL made absolute (against `against`) and ending in "/". */
export declare function normalizeBaseUrl(url: string, against?: string): string;
/** The delay before retry number `attempt` (0 first), in ms: capped, doubling, jittered. */
export declare function backoffDelay(
  attempt: number,
  options: Pick<RelayClientOptions, "backoffInitialMs" | "backoffMaxMs">,
  random?: () => number,
): number;
/** One state for several connections: idle when none is in use, else the worst. */
export declare function combineStates(states: readonly ConnectionState[]): ConnectionState;
/**
 * `DEFAULT_OPTIONS` with `options` over them, frozen.
 *
 * @throws TypeError on an unknown option or one of the wrong type
 */
export declare function mergeOptions(options?: Partial<RelayClientOptions>): Readonly<RelayClientOptions>;
