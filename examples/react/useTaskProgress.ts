// A React hook that follows a relay task while a component is mounted: it subscribes on
// mount and calls the returned stop function on unmount (or when the task changes).
// The package has no React dependency: this file is an example to copy into an app.
// tests/test_framework_example.py type-checks it against the packed package and
// @types/react under --strict, and runs it in Chromium (React's hooks from preact/compat).

import { useEffect, useState } from "react";
import type { RelayClient, RelayError, TaskState, Transport } from "comfy-relay-client";

export interface TaskProgress {
  /** the whole current state, once the relay sent one */
  state: TaskState | undefined;
  /** for the bar: 0 to 1, never going back, moving smoothly, 1 on success */
  progress: number;
  /** the task succeeded or failed, or a final error ended the subscription */
  ended: boolean;
  /** the last error; with `retrying: true` the subscription goes on */
  error: RelayError | undefined;
}

const START: TaskProgress = { state: undefined, progress: 0, ended: false, error: undefined };

export function useTaskProgress(relay: RelayClient, taskId: string, transport: Transport = "sse"): TaskProgress {
  const [task, setTask] = useState<TaskProgress>(START);
  useEffect(() => {
    setTask(START);
    const stop = relay.subscribe(taskId, {
      transport,
      onState: (state) => setTask((t) => ({ ...t, state, error: undefined })),
      onProgress: (progress) => setTask((t) => ({ ...t, progress })),
      onEnd: ({ state }) => setTask((t) => ({ ...t, state: state ?? t.state, ended: true })),
      onError: (error) => setTask((t) => ({ ...t, error, ended: t.ended || !error.retrying })),
    });
    return stop; // unmounted, or another task: end this subscription
  }, [relay, taskId, transport]);
  return task;
}
