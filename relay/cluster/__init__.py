"""Cluster mode: several relays share the work through Redis, one poll loop per task in all.

Imported only when `RELAY_REDIS_URL` is set: it is the one part of the relay that needs
redis-py.
"""

from .backend import RedisBackend

__all__ = ["RedisBackend"]
