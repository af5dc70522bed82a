"""A minimal upstream that answers the progress API at once, with a new state on every call.

Task IDs starting with `idle` never change (a queued task); any other task ID is running
and changes on every call, its state carrying `sentAt`, the `time.time()` at which the
answer was made, so load clients can measure the relay's delivery latency. Task IDs are
never unknown. `GET /stats` counts calls per task.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .common import HOST, hot_state, idle_state

calls: Counter[str] = Counter()


def envelope(data: object) -> bytes:
    body = {
        "status": 10,
        "apiInvokeId": "i_bench",
        "data": data,
        "subErrCode": None,
        "subErrMessage": None,
        "errCode": None,
        "errMessage": None,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def progress(request: Request) -> Response:
    task_id = str(json.loads(await request.body()).get("taskId", ""))
    calls[task_id] += 1
    if task_id.startswith("idle"):
        state = idle_state(task_id)
    else:
        state = hot_state(task_id, calls[task_id], time.time())
    return Response(envelope(state), media_type="application/json")


async def result(request: Request) -> Response:
    return Response(envelope({"images": [], "result": {}}), media_type="application/json")


async def stats(request: Request) -> Response:
    return JSONResponse({"calls": dict(calls), "total": sum(calls.values())})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/scc/comfy_get_progress", progress, methods=["POST"]),
        Route("/scc/comfy_get_result", result, methods=["POST"]),
        Route("/stats", stats),
        Route("/healthz", healthz),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
