"""Cursor pagination shared by every list endpoint: `limit`, `order`, `after`, `before` over time-ordered ids."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from fastapi import Depends, Query

from gateway.errors import bad_request, echo

T = TypeVar("T")
Conn = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool


@dataclass(frozen=True)
class PageParams:
    """A validated page request."""

    limit: int = 20
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    before: str | None = None


async def page_params(limit: Annotated[int, Query()] = 20, order: Annotated[str, Query()] = "desc",
                      after: Annotated[str | None, Query()] = None,
                      before: Annotated[str | None, Query()] = None) -> PageParams:
    """Read and check the pagination query parameters (hosted API limits and wording)."""
    if limit < 1:
        raise bad_request(f"Invalid 'limit': integer below minimum value. Expected a value >= 1, but got {limit} "
                          "instead.", "limit", "integer_below_min_value")
    if limit > 100:
        raise bad_request(f"Invalid 'limit': integer above maximum value. Expected a value <= 100, but got "
                          f"{limit} instead.", "limit", "integer_above_max_value")
    if order not in ("asc", "desc"):
        raise bad_request(f"Invalid value: '{echo(order)}'. Supported values are: 'asc' and 'desc'.", "order",
                          "invalid_value")
    return PageParams(limit=limit, order="asc" if order == "asc" else "desc", after=after or None,
                      before=before or None)


PageDep = Annotated[PageParams, Depends(page_params)]


@dataclass(frozen=True)
class Page:
    """One page of rows and whether more exist in the direction of travel."""

    rows: list[asyncpg.Record]
    has_more: bool


async def fetch_page(conn: Conn, *, select: str, where: str, args: Sequence[Any], page: PageParams,
                     id_column: str = "id") -> Page:
    """Run `SELECT {select} ... WHERE {where}` with the page's cursor conditions, order and limit.

    `where` uses $1..$n for `args`; ids sort by creation, so cursors are plain id comparisons.
    """
    return await fetch_keyed_page(conn, select=select, where=where, args=args, page=page, keys=(id_column,),
                                  after=None if page.after is None else (page.after,),
                                  before=None if page.before is None else (page.before,))


async def fetch_keyed_page(conn: Conn, *, select: str, where: str, args: Sequence[Any], page: PageParams,
                           keys: Sequence[str], after: Sequence[Any] | None,
                           before: Sequence[Any] | None) -> Page:
    """A page of rows ordered by the columns `keys` (the last one unique), the cursors given as those keys of the
    `after`/`before` rows (for lists not in id order the caller looks them up from the cursor ids). With only
    `before`, the rows just before the cursor are fetched in reverse and flipped back."""
    params = list(args)
    conditions = [where]
    desc = page.order == "desc"
    columns = ", ".join(keys)

    def row_value(values: Sequence[Any]) -> str:
        start = len(params) + 1
        params.extend(values)
        return "(" + ", ".join(f"${start + i}" for i in range(len(values))) + ")"

    if after is not None:
        conditions.append(f"({columns}) {'<' if desc else '>'} {row_value(after)}")
    if before is not None:
        conditions.append(f"({columns}) {'>' if desc else '<'} {row_value(before)}")
    reverse = before is not None and after is None
    direction = ("ASC" if desc else "DESC") if reverse else ("DESC" if desc else "ASC")
    params.append(page.limit + 1)
    order = ", ".join(f"{key} {direction}" for key in keys)
    rows = list(await conn.fetch(f"SELECT {select} WHERE {' AND '.join(conditions)} ORDER BY {order}"
                                 f" LIMIT ${len(params)}", *params))
    has_more = len(rows) > page.limit
    rows = rows[: page.limit]
    if reverse:
        rows.reverse()
    return Page(rows=rows, has_more=has_more)


def list_body(items: Sequence[dict[str, Any]], has_more: bool,
              id_of: Callable[[dict[str, Any]], str] = lambda item: str(item["id"])) -> dict[str, Any]:
    """The hosted API's list envelope."""
    return {
        "object": "list",
        "data": list(items),
        "first_id": id_of(items[0]) if items else None,
        "last_id": id_of(items[-1]) if items else None,
        "has_more": has_more,
    }
