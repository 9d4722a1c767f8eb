"""The connection to Redis, shared by a replica's stream writers and readers.

redis-py's own retries are off: a call that fails returns at once, and each loop that
uses the link waits out its own exponential backoff (with jitter) before trying again,
so an unreachable Redis never stalls a request, only the pooling loops.
"""

from __future__ import annotations

import logging
import random
from typing import Any
from urllib.parse import urlsplit

from router.metrics import SidecarMetrics
from router.settings import PoolingSettings

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
# A blocking XREAD waits up to READ_BLOCK_MS inside Redis; the socket timeout is longer.
READ_BLOCK_MS = 1000
SOCKET_TIMEOUT_S = 5.0
FIRST_BACKOFF_S = 0.05


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a call to an unreachable or restarting Redis raises."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


def make_client(settings: PoolingSettings) -> Any:
    """A ``redis.asyncio.Redis`` for ``settings.redis_url``, or a ``RedisCluster`` with
    ``cluster`` (rediss:// is TLS, with ``tls_ca_file`` as its CA bundle when set), without
    client-side retries. Every command the pooling sends names one stream (XADD, XREAD,
    XINFO), so a cluster serves each from the node holding its slot."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    url = settings.redis_url.get_secret_value()
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }
    if urlsplit(url).scheme == "rediss" and settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca_file)
    if settings.cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Backoff:
    """Exponential backoff with jitter, from FIRST_BACKOFF_S up to ``cap_s``."""

    def __init__(self, cap_s: float) -> None:
        self._cap_s = cap_s
        self._delay_s = FIRST_BACKOFF_S

    def next_delay(self) -> float:
        delay = self._delay_s
        self._delay_s = min(self._cap_s, self._delay_s * 2)
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self._delay_s = FIRST_BACKOFF_S


class RedisLink:
    """One client (a connection pool) and whether Redis answered last time."""

    def __init__(self, settings: PoolingSettings, metrics: SidecarMetrics) -> None:
        self.client = make_client(settings)
        self.where = redacted(settings.redis_url.get_secret_value())
        self.reconnect_max_s = settings.reconnect_max_s
        self._metrics = metrics
        self.connected = False
        # The first failure, and the first after each success, is logged with its cause
        # (refused, a wrong password, an unknown CA): one that never connected says why.
        self._failure_logged = False
        # Likewise the first command Redis answered with an error (out of memory under
        # ``maxmemory``, a read-only replica, an ACL), until a write goes through; and
        # apart, the first read refused (an ACL without reads), until a read goes through.
        self._refusal_logged = False
        self._read_refusal_logged = False

    def succeeded(self, wrote: bool = False) -> None:
        """A call went through; ``wrote``: it was a write (what ends a refusal)."""
        if not self.connected:
            logger.info("pooling: Redis at %s reachable", self.where)
        self.connected = True
        self._failure_logged = False
        self._metrics.pooling_connected.set(1)
        if wrote and self._refusal_logged:
            logger.info("pooling: Redis at %s takes writes again", self.where)
            self._refusal_logged = False
        if not wrote and self._read_refusal_logged:
            logger.info("pooling: Redis at %s takes reads again", self.where)
            self._read_refusal_logged = False

    def failed(self, error: BaseException, reading: bool = False) -> None:
        """A call failed: Redis is unreachable, or (an error reply) it refused the call, a
        read (``reading``) or a write. A refused read was told as a refused write (what
        this replica learns stays buffered) and, ended by each write that went through,
        told again after each: one replica's ACL without reads logged 11 lines for 3
        requests, and never that it learnt nothing from the others."""
        from redis.exceptions import MovedError, ResponseError

        if isinstance(error, ResponseError) and reading and not isinstance(error, MovedError):
            if not self._read_refusal_logged:
                logger.warning(
                    "pooling: Redis at %s refused a read (%s); this replica learns nothing "
                    "from the others until it reads again",
                    self.where,
                    error,
                )
            self._read_refusal_logged = True
            return
        if isinstance(error, ResponseError):  # it answered: reachable, and the reads go on
            if not self._refusal_logged:
                hint = ""
                if isinstance(error, MovedError):  # "MOVED <slot> <host:port>"
                    hint = (
                        ": it is a node of a Redis Cluster, whose streams live on other "
                        "nodes; set pooling.cluster = true"
                    )
                logger.warning(
                    "pooling: Redis at %s refused a command (%s%s); what this replica learns "
                    "stays buffered and is retried",
                    self.where,
                    error,
                    hint,
                )
            self._refusal_logged = True
            return
        if not self._failure_logged:
            logger.warning("pooling: Redis at %s unreachable (%s); retrying", self.where, error)
        self._failure_logged = True
        self.connected = False
        self._metrics.pooling_connected.set(0)

    async def close(self) -> None:
        await self.client.aclose()
