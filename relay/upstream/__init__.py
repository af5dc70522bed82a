"""The upstream: the `comfy_get_progress` API, reached with the server-side AccessKey pair.

`client` reads its envelopes and faults over one shared httpx client, `transport` carries
the requests (keep-alive HTTP/1.1, with an overall deadline per call), `signing` signs
them, and `budget` keeps the whole relay within the upstream's rate.
"""

from .budget import RateBudget
from .client import (
    NOT_FOUND_CODE,
    TaskNotFound,
    Unauthorized,
    UpstreamClient,
    UpstreamError,
    UpstreamHTTP,
    UpstreamUnavailable,
    make_http_client,
    read_envelope,
)
from .signing import ApiGatewaySigner, NoSigner, Signer, make_signer

__all__ = [
    "NOT_FOUND_CODE",
    "ApiGatewaySigner",
    "NoSigner",
    "RateBudget",
    "Signer",
    "TaskNotFound",
    "Unauthorized",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamHTTP",
    "UpstreamUnavailable",
    "make_http_client",
    "make_signer",
    "read_envelope",
]
