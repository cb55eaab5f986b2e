"""The asyncpg pool and ordered SQL migrations."""

import importlib.resources
import json
import logging
import re
from typing import Any

import asyncpg
import asyncpg.pool
import orjson

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError, asyncpg.TooManyConnectionsError)
"""What a lost, restarting or full database raises (a refused or reset connection is an OSError): worth a retry."""


def database_lost(exc: BaseException) -> bool:
    """True when `exc` says the database is unavailable: one of DATABASE_UNAVAILABLE, or a connection lost
    mid-request that asyncpg reports otherwise: a transaction whose connection died raises an InterfaceError from its
    exit (the loss as its context), and a connection whose server said farewell between two operations an
    InternalClientError. Only asyncpg's own errors are looked into: any other bug raised while an OSError was being
    handled is not an outage."""
    if isinstance(exc, (*DATABASE_UNAVAILABLE, asyncpg.InternalClientError)):
        return True
    if not isinstance(exc, asyncpg.InterfaceError):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DATABASE_UNAVAILABLE):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


_MIGRATION_LOCK = 7_254_311_001
_log = logging.getLogger(__name__)


_LONG_NUMBER = re.compile(r"\d{19}")


def _json_encode(value: Any) -> str:
    """orjson (several times faster); the stdlib for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value)


def storable_text(text: str) -> str:
    """`text` with U+FFFD for each NUL and each lone surrogate (a model may emit a broken `\\ud83d` escape):
    Postgres refuses both in text and jsonb, so a write holding one would fail every time it is retried (text
    from elsewhere: a model's reply or tool arguments, a program's output, an error)."""
    text = text.replace("\x00", "\ufffd")
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:  # pairs written as two code points are joined; lone halves become U+FFFD
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def storable(value: Any) -> Any:
    """`storable_text` for every string (keys too) in a JSON-like value."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def with_as_sent(doc: Any, as_sent: Any) -> Any:
    """`doc` with its fields kept in the `as_sent` column laid over it (migration 0016): jsonb reordered the keys
    inside them, `as_sent` has them in the order they were sent. None stays None."""
    if doc is None or not as_sent:
        return doc
    return {**doc, **as_sent}


_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1
"""The integers orjson reads and writes (i64 and u64)."""


def _json_int(text: str) -> int | float:
    """A JSON integer, as a float beyond 64 bits.

    Postgres prints a large number stored from a float (`1e20` in a function's JSON schema or a file
    attribute) as an integer (`100000000000000000000`). Read back as a Python int, orjson could not
    serialise it again (every response, event and SSE frame would fail); as a float it is what came in.
    """
    if len(text) <= 20:  # 2**64 - 1 has 20 digits, -(2**63) 19 and the sign
        value = int(text)
        if _MIN_INT <= value <= _MAX_INT:
            return value
    return float(text)


def _json_decode(text: str) -> Any:
    """orjson, unless a 19+ digit run might be an integer orjson would round to a float: then the stdlib,
    which keeps 64-bit integers exact and reads larger ones as floats (see `_json_int`)."""
    if _LONG_NUMBER.search(text) is None:
        return orjson.loads(text)
    return json.loads(text, parse_int=_json_int)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_json_encode, decoder=_json_decode, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_json_encode, decoder=_json_decode, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset query (one round trip per release).

    Pooled connections never carry session state: LISTEN runs on dedicated connections (`connect`),
    advisory locks are transaction-scoped, nothing uses SET or WITH HOLD cursors. asyncpg still rolls
    back an open transaction and drops listeners before calling this.
    """
    return None


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections encode and decode json/jsonb as Python objects."""
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection,
                                     reset=_keep_session)
    assert pool is not None
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """A single connection with the same codecs as the pool (for LISTEN and tools)."""
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) of every migration shipped in this package, in order."""
    folder = importlib.resources.files("threadline_core") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def run_migrations(dsn: str) -> list[str]:
    """Apply pending migrations once, whichever process gets there first; return those applied."""
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
            _log.info("applied migration %s", version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        await conn.close()
    return applied


async def claim_event(conn: "asyncpg.Connection | asyncpg.pool.PoolConnectionProxy", consumer: str,
                      event_id: str) -> bool:
    """Record that `consumer` applies `event_id`; False if it already did (call inside the tx)."""
    row = await conn.fetchval(
        "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        consumer,
        event_id,
    )
    return row is not None
