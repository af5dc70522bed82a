"""Access tokens: HS256 JWTs that name the task IDs their holder may watch.

Off unless `RELAY_TOKEN_SECRET` is set. A token's claims are
`{"tasks": ["<taskId>", ...], "exp": <Unix seconds>}`; `exp` is required, `nbf` is
honoured, and `iat`, `aud` and anything else are ignored. `exp` and `nbf` allow
`CLOCK_LEEWAY` seconds of skew between the minting backend's clock and the relay's.
The application that starts a task mints a token for it with the same secret
(or `relay token TASK_ID --ttl 600`) and hands it to the browser, which passes it
as `?token=` (SSE, `GET /v1/tasks/{id}`) or as the `token` field of each WebSocket
`subscribe`. A token is checked when a subscription starts; a stream already open
is not cut when its token expires.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from jwt.types import Options

ALGORITHM = "HS256"
TASKS_CLAIM = "tasks"
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
MAX_TOKEN_LENGTH = 16_384
CLOCK_LEEWAY = 30.0
DECODE_OPTIONS: Options = {"require": ["exp"], "verify_aud": False, "verify_iat": False}


class SecretTooShort(ValueError):
    def __init__(self) -> None:
        super().__init__(f"must be at least {MIN_SECRET_BYTES} bytes long")


def check_secret(secret: str) -> str:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise SecretTooShort()
    return secret


def mint(secret: str, task_ids: Iterable[str], ttl: float, now: float | None = None) -> str:
    """A token for `task_ids`, valid for `ttl` seconds from `now`."""
    issued = time.time() if now is None else now
    claims = {TASKS_CLAIM: list(task_ids), "iat": int(issued), "exp": int(issued + ttl)}
    return jwt.encode(claims, check_secret(secret), algorithm=ALGORITHM)


@dataclass(frozen=True)
class Grant:
    """What one request's token allows; `problem` says why it allows nothing."""

    tasks: frozenset[str] = frozenset()
    everything: bool = False
    problem: str | None = None

    def refusal(self, task_id: str) -> str | None:
        """None when the task may be watched, otherwise a message for the client."""
        if self.everything:
            return None
        if self.problem is not None:
            return self.problem
        if task_id not in self.tasks:
            return f"the token does not cover task {task_id}"
        return None


OPEN = Grant(everything=True)


def grant(secret: str | None, token: object) -> Grant:
    """Read a client's token; with no secret configured, everything is allowed.

    Messages never repeat the token, and a forged or malformed one is not told
    apart from another: the client learns only that it was not accepted.
    """
    if secret is None:
        return OPEN
    if token is None or token == "":
        return Grant(problem="a token is required to watch this task")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return Grant(problem="the token is not valid")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options=DECODE_OPTIONS, leeway=CLOCK_LEEWAY
        )
    except jwt.ExpiredSignatureError:
        return Grant(problem="the token has expired")
    except jwt.InvalidTokenError:
        return Grant(problem="the token is not valid")
    tasks = claims.get(TASKS_CLAIM)
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        return Grant(problem=f"the token has no '{TASKS_CLAIM}' list of task IDs")
    return Grant(tasks=frozenset(tasks))
