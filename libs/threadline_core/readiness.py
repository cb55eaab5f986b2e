"""Dependency checks behind /readyz: is the broker, the database, Qdrant reachable right now."""

import asyncio

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
