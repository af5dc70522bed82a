"""Server-held watches and the signed webhooks that tell a backend about its tasks.

`service` holds the watches in the hub, `store` is the interface of where they are kept
(`sqlite_store` for a relay alone, `redis_store` in a cluster), and `webhooks` delivers
their events.
"""

from .service import Watches
from .sqlite_store import DataDirInUse, SqliteStore, default_data_dir
from .store import Watch, WatchStore
from .webhooks import RetryPolicy, Webhooks

__all__ = [
    "DataDirInUse",
    "RetryPolicy",
    "SqliteStore",
    "Watch",
    "WatchStore",
    "Watches",
    "Webhooks",
    "default_data_dir",
]
