"""Telling every API process that the active release changed, through Redis pub/sub.

The active pointer on disk is the truth; this is only a nudge so processes switch
at once instead of at their next poll. With no Redis (the embedded default) or when
Redis is unreachable, nothing is sent and polling alone does the job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aioredis

from indexer.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = 2.0


def channel(settings: Settings) -> str:
    """The pub/sub channel of one deployment: named after its job queue, so two deployments sharing a Redis
    (`LOCKSTEP_QUEUE` set apart) do not nudge each other."""
    return f"{settings.queue}:active-release"


def announce(settings: Settings, release_id: str) -> bool:
    """Publish that `release_id` is now active; False when there is no Redis to publish to."""
    url = settings.redis_url()
    if url is None:
        return False
    try:
        with redis.Redis.from_url(url, socket_timeout=2.0) as client:
            client.publish(channel(settings), release_id)
        return True
    except redis.RedisError as exc:
        log.warning("could not announce release %s over Redis (%s); services will see it at their next poll", release_id, exc)
        return False


async def listen(settings: Settings, on_change: Callable[[str], Awaitable[None]]) -> None:
    """Call `on_change(release_id)` for every announcement until cancelled; reconnects after errors."""
    url = settings.redis_url()
    if url is None:
        return
    while True:
        client = aioredis.Redis.from_url(url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel(settings))
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await on_change(message["data"].decode())
        except (redis.RedisError, OSError) as exc:
            log.warning("release announcements unavailable (%s); polling continues, retrying in %.0fs", exc, RECONNECT_DELAY_S)
        except Exception:
            log.exception("release announcement listener failed; polling continues, retrying in %.0fs", RECONNECT_DELAY_S)
        finally:
            await client.aclose()
        await asyncio.sleep(RECONNECT_DELAY_S)
