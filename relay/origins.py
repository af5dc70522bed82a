"""Which browser origins may use the relay: CORS for HTTP, the Origin check for WebSockets."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit


def origin_allowed(headers: Mapping[str, str], allowed: tuple[str, ...]) -> bool:
    """True for a request without an Origin (not a browser), a same-origin one, or a listed one.

    Browsers send Origin on every WebSocket upgrade, and CORS middleware does not
    look at WebSocket requests, so this check is what stops a page on another site
    from subscribing with a visitor's browser.
    """
    origin = headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    host = headers.get("host")
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()
