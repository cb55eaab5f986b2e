"""Dependency checks behind /readyz: is the broker, the database, Qdrant reachable right now."""

import asyncio

import asyncpg
from aiokafka import AIOKafkaProducer


async def database_ready(pool: asyncpg.Pool) -> bool:
    """True when a trivial query answers within a second."""
    try:
        async with asyncio.timeout(1.0):
            return bool(await pool.fetchval("SELECT 1"))
    except Exception:
        return False


async def broker_ready(producer: AIOKafkaProducer) -> bool:
    """True when the broker answers a metadata request within two seconds."""
    try:
        async with asyncio.timeout(2.0):
            await producer.client.fetch_all_metadata()
            return True
    except Exception:
        return False
