"""SQL access to the stack's database for tests and tools, from sync or async code."""

from typing import Any

import asyncpg

from threadline_core.db import connect
from threadline_devstack._proc import run_async


class Db:
    """Run SQL against the stack's database, from sync tests (`fetch`) or async tests (`afetch`)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def _call(self, method: str, query: str, *args: Any) -> Any:
        conn: asyncpg.Connection = await connect(self.dsn)
        try:
            return await getattr(conn, method)(query, *args)
        finally:
            await conn.close()

    async def afetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """All rows."""
        rows: list[asyncpg.Record] = await self._call("fetch", query, *args)
        return rows

    async def afetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """The first row, or None."""
        row: asyncpg.Record | None = await self._call("fetchrow", query, *args)
        return row

    async def afetchval(self, query: str, *args: Any) -> Any:
        """The first column of the first row."""
        return await self._call("fetchval", query, *args)

    async def aexecute(self, query: str, *args: Any) -> str:
        """Run a statement; returns the status string."""
        status: str = await self._call("execute", query, *args)
        return status

    def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """All rows (sync)."""
        return run_async(self.afetch(query, *args))

    def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """The first row, or None (sync)."""
        return run_async(self.afetchrow(query, *args))

    def fetchval(self, query: str, *args: Any) -> Any:
        """The first column of the first row (sync)."""
        return run_async(self.afetchval(query, *args))

    def execute(self, query: str, *args: Any) -> str:
        """Run a statement (sync)."""
        return run_async(self.aexecute(query, *args))
