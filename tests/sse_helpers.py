"""Reading the gateway's server-sent events as a plain HTTP client does, without the SDK."""

from collections.abc import Callable

import httpx


def read_sse(response: httpx.Response, *, stop_after: int | None = None, comments: list[str] | None = None,
             until: Callable[[dict[str, str]], bool] | None = None,
             into: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Parse an SSE body into events ({'id'?, 'event', 'data'}); stop at `done`, after `stop_after` events or at the
    first event `until` accepts. `into`: the list to append them to as they come (another thread may watch it)."""
    events: list[dict[str, str]] = [] if into is None else into
    current: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            if comments is not None:
                comments.append(line)
            continue
        if line == "":
            if current:
                events.append(current)
                if current.get("event") == "done" or (stop_after is not None and len(events) >= stop_after) \
                        or (until is not None and until(current)):
                    return events
                current = {}
            continue
        field, _, value = line.partition(":")
        current[field] = value[1:] if value.startswith(" ") else value
    return events


def outbox_events(events: list[dict[str, str]]) -> list[tuple[int, str]]:
    """(id, event) of the events that carry an id (outbox events; deltas have none)."""
    return [(int(e["id"]), e["event"]) for e in events if "id" in e]
