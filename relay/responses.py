"""The relay's HTTP error responses: each body has the shape of an `error` event's data."""

from __future__ import annotations

from starlette.responses import JSONResponse

from .protocol import ErrorCode, error_data
from .service import Refusal

RETRY_AFTER_SECONDS = 5


def error_response(status: int, code: ErrorCode, message: str) -> JSONResponse:
    """An HTTP error whose body has the same shape as an `error` event's data."""
    return JSONResponse(error_data(code, message), status_code=status)


def overloaded_response(message: str) -> JSONResponse:
    """`503` with `Retry-After`: the relay is full, the client should come back later."""
    return JSONResponse(
        error_data(ErrorCode.OVERLOADED, message, retrying=True),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def refusal_response(refusal: Refusal) -> JSONResponse:
    """The HTTP answer to a subscription or request that `Relay` refused."""
    if refusal.retrying:
        return overloaded_response(refusal.message)
    return error_response(refusal.status, refusal.code, refusal.message)
