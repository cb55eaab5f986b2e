"""Dead letters: records a consumer parked because its handler kept failing on their data.

`python -m gateway dead-letters list` prints the ones not replayed yet; `python -m gateway dead-letters replay ID
[ID ...]` (after fixing what made them fail) sends each back to its topic, with its key, and marks it replayed.
The gateway's entry point hosts the command so that it ships in the service image, as `gateway migrate` does.
"""

import argparse

import asyncpg

from threadline_core.kafka import create_producer
from threadline_core.settings import CoreSettings


async def list_parked(conn: asyncpg.Connection) -> None:
    """Print one line per dead letter not replayed yet."""
    rows = await conn.fetch("SELECT id, consumer_group, topic, partition, record_offset, event_type, attempts,"
                            " parked_at, error FROM dead_letters WHERE replayed_at IS NULL ORDER BY id")
    for r in rows:
        print(f"{r['id']}  {r['parked_at']:%Y-%m-%d %H:%M:%S}  {r['consumer_group']}  {r['topic']}[{r['partition']}]"
              f"@{r['record_offset']}  {r['event_type']}  x{r['attempts']}  {r['error'][:200]}")
    print(f"{len(rows)} parked")


async def replay(conn: asyncpg.Connection, bootstrap: str, ids: list[int]) -> int:
    """Publish the records again (consumers are idempotent) and mark them replayed; returns how many."""
    rows = await conn.fetch("SELECT id, topic, record_key, value FROM dead_letters WHERE id = ANY($1::bigint[])"
                            " AND replayed_at IS NULL ORDER BY id", ids)
    producer = create_producer(bootstrap)
    await producer.start()
    try:
        for row in rows:
            await producer.send_and_wait(row["topic"], row["value"], key=row["record_key"])
            await conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = $1", row["id"])
    finally:
        await producer.stop()
    return len(rows)


async def command(settings: CoreSettings, argv: list[str]) -> None:
    """Run `list` or `replay ID [ID ...]` against the database and broker of `settings`."""
    parser = argparse.ArgumentParser(prog="python -m gateway dead-letters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="dead letters not replayed yet")
    replaying = commands.add_parser("replay", help="publish them again")
    replaying.add_argument("ids", nargs="+", type=int)
    args = parser.parse_args(argv)
    conn = await asyncpg.connect(settings.database_url)
    try:
        if args.command == "list":
            await list_parked(conn)
        else:
            print(f"{await replay(conn, settings.kafka_bootstrap_servers, args.ids)} replayed")
    finally:
        await conn.close()
