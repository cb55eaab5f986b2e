"""Dependency checks behind /readyz: is the broker, the database, Qdrant reachable right now."""

import asyncio
from collections.abc import Iterable
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer


async def database_ready(pool: asyncpg.Pool) -> bool:
    """True when a trivial query answers within a second."""
    try:
        async with asyncio.timeout(1.0):
            return bool(await pool.fetchval("SELECT 1"))
    except Exception:
        return False


async def broker_topics(producer: AIOKafkaProducer) -> set[str] | None:
    """The broker's topics if it answers a metadata request within two seconds, else None."""
    try:
        async with asyncio.timeout(2.0):
            metadata = await producer.client.fetch_all_metadata()
    except Exception:
        return None
    return set(metadata.topics())


async def broker_ready(producer: AIOKafkaProducer, topics: Iterable[str] = ()) -> bool:
    """True when the broker answers a metadata request within two seconds and knows `topics`."""
    known = await broker_topics(producer)
    return known is not None and set(topics) <= known


async def qdrant_ready(client: Any) -> bool:
    """True when Qdrant lists its collections within two seconds (`QdrantClient` or `AsyncQdrantClient`).

    Local mode (an in-process store, no server) is always reachable; a synchronous client asks the
    server from a worker thread so the event loop is never blocked.
    """
    if "Local" in type(getattr(client, "_client", None)).__name__:
        return True
    try:
        async with asyncio.timeout(2.0):
            if asyncio.iscoroutinefunction(client.get_collections):
                await client.get_collections()
            else:
                await asyncio.to_thread(client.get_collections)
            return True
    except Exception:
        return False


async def qdrant_url_ready(url: str) -> bool:
    """True when the Qdrant server at `url` answers /readyz within two seconds; no URL (local mode,
    in-process) is always ready."""
    if not url:
        return True
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            response = await client.get(url.rstrip("/") + "/readyz")
    except httpx.HTTPError:
        return False
    return response.status_code == 200
