"""Alibaba Cloud API Gateway digest signing (HmacSHA256), both sides of it.

The client side, :class:`ApiGatewaySigner`, adds the ``x-ca-*`` headers the gateway
checks on every upstream call. The gateway side, :func:`verify_request`, is what the
embedded simulator runs, and it answers with the gateway's own ``X-Ca-Error-Message``
wording. Both build the string to sign with :func:`string_to_sign`:

    METHOD \\n Accept \\n Content-MD5 \\n Content-Type \\n Date \\n
    name:value \\n ... (headers named in x-ca-signature-headers, sorted) path[?sorted query]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Protocol, runtime_checkable
from urllib.parse import unquote

SIGNATURE_METHOD = "HmacSHA256"
SIGNED_HEADERS = ("x-ca-timestamp", "x-ca-key", "x-ca-nonce", "x-ca-signature-method")
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
TIMESTAMP_WINDOW_MS = 15 * 60 * 1000

# X-Ca-Error-Message values, worded as Alibaba Cloud API Gateway words them.
ERR_INVALID_APPKEY = "Invalid AppKey"
ERR_EMPTY_SIGNATURE = "Empty Signature"
ERR_INVALID_SIGNATURE = "Invalid Signature"
ERR_INVALID_TIMESTAMP = "Invalid Timestamp"
ERR_TIMESTAMP_EXPIRED = "Timestamp Expired"
ERR_INVALID_CONTENT_MD5 = "Invalid Content-MD5"
ERR_NONCE_USED = "Nonce Used"

# Never part of the signed-header block, even when listed in x-ca-signature-headers.
_UNSIGNABLE = frozenset(
    {"x-ca-signature", "x-ca-signature-headers", "accept", "content-md5", "content-type", "date"}
)


@runtime_checkable
class Signer(Protocol):
    """Produces the headers to add to one upstream request."""

    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]: ...


def _uuid_nonce() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` writes it, in a third of its time."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


def content_md5(body: bytes) -> str:
    """base64(MD5(body)): the value of the ``content-md5`` header."""
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


def _hmac_sha256_b64(secret: str, message: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _signed_header_names(lowered: Mapping[str, str]) -> list[str]:
    """Names listed in x-ca-signature-headers, as written, deduplicated and sorted."""
    listed = (n.strip() for n in lowered.get("x-ca-signature-headers", "").split(","))
    return sorted({n for n in listed if n and n.lower() not in _UNSIGNABLE})


def canonical_resource(path: str) -> str:
    """The path, plus its query sorted by key; ``k`` alone when a value is empty.

    Keys and values are percent-decoded; a repeated key keeps its first value.
    """
    if "?" not in path:
        return path
    base, _, query = path.partition("?")
    params: dict[str, str] = {}
    for pair in query.split("&"):
        if pair:
            key, _, value = pair.partition("=")
            params.setdefault(unquote(key), unquote(value))
    if not params:
        return base
    return base + "?" + "&".join(k if not v else f"{k}={v}" for k, v in sorted(params.items()))


def string_to_sign(method: str, headers: Mapping[str, str], path: str) -> str:
    """The gateway's string to sign; header names are matched case-insensitively."""
    lowered = _lowered(headers)
    lines = [method.upper()]
    lines += [lowered.get(n, "") for n in ("accept", "content-md5", "content-type", "date")]
    lines += [f"{n}:{lowered.get(n.lower(), '')}" for n in _signed_header_names(lowered)]
    lines.append(canonical_resource(path))
    return "\n".join(lines)


class ApiGatewaySigner:
    """Signs requests with an AccessKey pair; a fresh nonce and timestamp on every call.

    `sign` writes the string to sign out directly, in the order `string_to_sign` puts it
    (its signed headers are always `SIGNED_HEADERS`, sorted), and formats the `date`
    header once per second: it runs on every upstream call.
    """

    __slots__ = ("_clock", "_date", "_date_second", "_key", "_key_id", "_nonce", "_secret")

    def __init__(
        self,
        access_key_id: str,
        access_key_secret: str,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = _uuid_nonce,
    ) -> None:
        if not access_key_id or not access_key_secret:
            raise ValueError("ApiGatewaySigner needs both an AccessKey ID and an AccessKey secret")
        self._key_id = access_key_id
        self._secret = access_key_secret
        self._key = access_key_secret.encode("utf-8")
        self._clock = clock
        self._nonce = nonce
        self._date_second: int | None = None
        self._date = ""

    def __repr__(self) -> str:
        return f"ApiGatewaySigner(access_key_id={self._key_id!r}, access_key_secret='***')"

    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """Headers for one request; ``body`` must be the exact bytes that will be sent."""
        now = self._clock()
        second = int(now)
        if second != self._date_second:
            self._date = formatdate(now, usegmt=True)
            self._date_second = second
        timestamp = str(int(now * 1000))
        nonce = self._nonce()
        # The gateway refuses a content-md5 sent with an empty body, and signs an empty line.
        md5 = content_md5(body) if body else ""
        # string_to_sign's layout, its signed headers (SIGNED_HEADERS) sorted by name.
        to_sign = (
            f"{method.upper()}\n{JSON_CONTENT_TYPE}\n{md5}\n{JSON_CONTENT_TYPE}\n{self._date}\n"
            f"x-ca-key:{self._key_id}\nx-ca-nonce:{nonce}\n"
            f"x-ca-signature-method:{SIGNATURE_METHOD}\nx-ca-timestamp:{timestamp}\n"
            f"{canonical_resource(path)}"
        )
        headers = {
            "date": self._date,
            "x-ca-key": self._key_id,
            "x-ca-timestamp": timestamp,
            "x-ca-nonce": nonce,
            "x-ca-signature-method": SIGNATURE_METHOD,
            "x-ca-signature-headers": _SIGNED_HEADER_LIST,
            "Content-Type": JSON_CONTENT_TYPE,
            "Accept": JSON_CONTENT_TYPE,
        }
        if body:
            headers["content-md5"] = md5
        signature = hmac.digest(self._key, to_sign.encode("utf-8"), "sha256")
        headers["x-ca-signature"] = base64.b64encode(signature).decode("ascii")
        return headers


_SIGNED_HEADER_LIST = ",".join(SIGNED_HEADERS)


class NoSigner:
    """For upstreams that need no signature: adds ``x-ca-key`` when a key ID is given."""

    __slots__ = ("_key_id",)

    def __init__(self, access_key_id: str | None = None) -> None:
        self._key_id = access_key_id or None

    def __repr__(self) -> str:
        return f"NoSigner(access_key_id={self._key_id!r})"

    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {"x-ca-key": self._key_id} if self._key_id else {}


def make_signer(
    scheme: str = "apigw",
    access_key_id: str | None = None,
    access_key_secret: str | None = None,
) -> Signer:
    """``"apigw"`` (default) or ``"none"``; apigw without a full key pair signs nothing."""
    name = scheme.strip().lower() or "apigw"
    if name == "none":
        return NoSigner(access_key_id)
    if name != "apigw":
        raise ValueError(f"unknown signing scheme {scheme!r}: expected 'apigw' or 'none'")
    if access_key_id and access_key_secret:
        return ApiGatewaySigner(access_key_id, access_key_secret)
    return NoSigner(access_key_id)


class NonceCache:
    """Nonces accepted recently, bounded both in time and in count (oldest dropped first).

    A request is accepted while its timestamp is within 15 minutes of now, so a nonce
    must be remembered for up to 30 minutes after it is first seen. Not thread-safe.
    """

    def __init__(self, max_entries: int = 10_000, ttl_seconds: float = 30 * 60) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._ttl = ttl_seconds
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._expiry

    def add(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was already recorded and not yet expired."""
        self._forget_expired(now)
        if nonce in self._expiry:
            return False
        self._expiry[nonce] = now + self._ttl
        while len(self._expiry) > self._max_entries:
            self._expiry.popitem(last=False)
        return True

    def _forget_expired(self, now: float) -> None:
        while self._expiry:
            nonce, expires = next(iter(self._expiry.items()))
            if expires > now:
                return
            del self._expiry[nonce]


def header_required(name: str) -> str:
    """The gateway's message for a missing header (error code I400MH)."""
    return f"Header `{name}` is Required"


def error_status(message: str) -> int:
    """HTTP status the gateway pairs with an X-Ca-Error-Message from this module."""
    return 404 if message == ERR_EMPTY_SIGNATURE else 400


def _timestamp_problem(raw: str | None, now: float) -> str | None:
    if not raw:
        return header_required("X-Ca-Timestamp")
    try:
        millis = int(raw.strip())
    except ValueError:
        return ERR_INVALID_TIMESTAMP
    if abs(now * 1000 - millis) > TIMESTAMP_WINDOW_MS:
        return ERR_TIMESTAMP_EXPIRED
    return None


def _content_md5_problem(sent: str | None, body: bytes) -> str | None:
    if not body:
        return ERR_INVALID_CONTENT_MD5 if sent else None
    expected = content_md5(body).encode()
    if sent is None or not hmac.compare_digest(sent.strip().encode("utf-8"), expected):
        return ERR_INVALID_CONTENT_MD5
    return None


def _signature_problem(
    method: str, path: str, headers: Mapping[str, str], secret: str, sent: str
) -> str | None:
    expected = string_to_sign(method, headers, path)
    signature = _hmac_sha256_b64(secret, expected)
    if hmac.compare_digest(signature.encode(), sent.strip().encode("utf-8")):
        return None
    # Headers cannot carry newlines, so the gateway shows them as '#'.
    return f"{ERR_INVALID_SIGNATURE}, Server StringToSign:`{expected.replace(chr(10), '#')}`"


def verify_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Mapping[str, str],
    now: float,
    seen_nonces: NonceCache,
) -> str | None:
    """Check a request as the gateway does: None if valid, else its X-Ca-Error-Message.

    Only a request that passes every other check consumes its nonce.
    """
    lowered = _lowered(headers)
    key = lowered.get("x-ca-key", "").strip()
    if not key:
        return header_required("X-Ca-Key")
    secret = secrets.get(key)
    if secret is None:
        return ERR_INVALID_APPKEY
    sent_signature = lowered.get("x-ca-signature", "")
    if not sent_signature.strip():
        return ERR_EMPTY_SIGNATURE
    method_name = lowered.get("x-ca-signature-method", SIGNATURE_METHOD).strip()
    if method_name.lower() != SIGNATURE_METHOD.lower():
        return f"Invalid Header `X-Ca-Signature-Method` {method_name!r} is not supported"
    nonce = lowered.get("x-ca-nonce", "").strip()
    problem = (
        _timestamp_problem(lowered.get("x-ca-timestamp"), now)
        or (None if nonce else header_required("X-Ca-Nonce"))
        or _content_md5_problem(lowered.get("content-md5"), body)
        or _signature_problem(method, path, headers, secret, sent_signature)
    )
    if problem is not None:
        return problem
    return None if seen_nonces.add(nonce, now) else ERR_NONCE_USED
