"""Run the relay on a chosen upstream transport.

    python -m bench.relay_transport KIND [--code DIR] relay serve ...

A benchmark-only switch, so that bench.economy can put every transport it compares into the
same relay, unchanged but for the client that `make_http_client` returns:

- `upstream`: the relay as it is (httpx over `UpstreamTransport`, requests handed straight
  to the transport);
- `upstream-send`: the same transport behind `httpx.AsyncClient.send` (the client's cookie
  jar, auth flow, redirects and hooks on every call);
- `httpx-aiohttp`: `httpx_aiohttp.AiohttpTransport` behind `AsyncClient.send`;
- `httpcore`: httpx's own transport (httpcore's pool) behind `AsyncClient.send`, sniffio
  installed;
- `httpcore-nosniffio`: the same with `import sniffio` failing, as on an install that lacks
  it (bench/transports.py).

`--cprofile PATH`: SIGUSR1 starts cProfile in the relay's event-loop thread, timed by the
process's CPU clock (so time the process spends preempted, as on a loaded machine, counts
nowhere: py-spy samples by the wall clock and charges it to whatever ran last); a second
SIGUSR1 stops it and writes PATH (pstats) and PATH.txt (the top functions).

`--code DIR` imports the relay from DIR instead (bench.economy puts the last commit's relay
there, for the rows measured before this change); only `httpcore` and `httpcore-nosniffio`
mean anything with it, since the committed relay builds its own client.
"""

from __future__ import annotations

import runpy
import sys

KINDS = ("upstream", "upstream-send", "httpx-aiohttp", "httpcore", "httpcore-nosniffio")


def patch(kind: str) -> None:
    import httpx

    import relay.upstream as upstream

    if kind == "upstream":
        return

    def make_http_client(
        timeout: float, max_connections: int, transport: httpx.AsyncBaseTransport | None = None
    ) -> httpx.AsyncClient:
        if transport is None:
            limits = httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            )
            if kind == "upstream-send":
                from relay.upstream.transport import UpstreamTransport

                transport = UpstreamTransport(max_connections=max_connections, retries=1)
            elif kind == "httpx-aiohttp":
                from httpx_aiohttp import AiohttpTransport

                transport = AiohttpTransport(limits=limits, retries=1)
            else:
                transport = httpx.AsyncHTTPTransport(limits=limits, retries=1)
        # A plain client: the relay's UpstreamClient then sends with `AsyncClient.send`.
        return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(timeout))

    upstream.make_http_client = make_http_client  # type: ignore[assignment]


def profile_on_signal(path: str) -> None:
    """SIGUSR1: start a CPU-time cProfile of the main thread; the next one: stop and write it."""
    import cProfile
    import io
    import pstats
    import signal
    import time

    state: dict[str, cProfile.Profile] = {}

    def toggle(signum: int, frame: object) -> None:
        profile = state.pop("on", None)
        if profile is None:
            state["on"] = cProfile.Profile(time.process_time)
            state["on"].enable()
            return
        profile.disable()
        profile.dump_stats(path)
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(60)
        stats.sort_stats("cumulative").print_stats(80)
        with open(path + ".txt", "w") as out:
            out.write(text.getvalue())

    signal.signal(signal.SIGUSR1, toggle)


def main() -> None:
    args = sys.argv[1:]
    kind = args.pop(0)
    if args[:1] == ["--cprofile"]:
        args.pop(0)
        profile_on_signal(args.pop(0))
    if kind not in KINDS:
        raise SystemExit(f"relay_transport: unknown kind {kind!r}: one of {', '.join(KINDS)}")
    committed = False
    if args[:1] == ["--code"]:
        args.pop(0)
        sys.path.insert(0, args.pop(0))
        committed = True
    if kind == "httpcore-nosniffio":
        from .transports import hide_sniffio

        hide_sniffio()
    if not committed:
        patch(kind)
    module, *rest = args
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
