"""Server-sent events: `stream: true` run responses and the subscribe endpoints.

- `run_event_stream(...)` is what create-run, create-thread-and-run and submit-tool-outputs return
  when `stream` is true: the hosted API's event names and payloads, ending with `event: done` /
  `data: [DONE]` after the run's terminal event (or `thread.run.requires_action`), or after an `error`
  event once the run was deleted with its thread. A stream the gateway ends before its run (shutting down, or a
  client too far behind) ends with an `error` event (code `stream_interrupted`) and no `done`.
- `GET /v1/threads/{thread_id}/runs/{run_id}/events`: the same for an existing run, from its start
  (or after `Last-Event-ID`), until it ends.
- `GET /v1/events?types=a,b`: every public event of the project, live (and, with `Last-Event-ID`,
  what was missed first). Never ends on its own.

Every outbox event carries `id: <seq>`; deltas carry none, so a reconnect with `Last-Event-ID`
replays exactly the events after the last one received (from the `events` table) and continues
live, deduplicated by seq. A comment line is sent when a stream is idle (heartbeat).
"""

import asyncio
import collections
import copy
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from gateway.deps import CallerDep, PoolDep
from gateway.errors import bad_request, echo
from gateway.fanout import DELTA_TYPES, EventFanout, Subscription
from gateway.pagination import Conn
from gateway.service import missing_in_thread
from gateway.settings import GatewaySettings
from threadline_core.db import database_lost, with_as_sent
from threadline_core.events import PUBLIC_EVENT_TYPES, EventEnvelope
from threadline_core.topics import EVENTS

router = APIRouter(prefix="/v1", tags=["streams"])
_log = logging.getLogger(__name__)

TERMINAL_RUN_EVENTS = frozenset({"thread.run.completed", "thread.run.failed", "thread.run.cancelled",
                                 "thread.run.expired", "thread.run.incomplete"})
PAUSE_RUN_EVENT = "thread.run.requires_action"
_TERMINAL_STATUSES = sorted(event.removeprefix("thread.run.") for event in TERMINAL_RUN_EVENTS)
_OPENED = {"thread.message.in_progress": "message", "thread.run.step.in_progress": "step"}
"""A message's or step's deltas follow its `in_progress` event (which follows `created`), as on the hosted API."""
_FINISHED = {"thread.message.completed": "message", "thread.message.incomplete": "message",
             "thread.run.step.completed": "step", "thread.run.step.failed": "step",
             "thread.run.step.cancelled": "step", "thread.run.step.expired": "step"}
_DELTA_KIND = {"thread.message.delta": "message", "thread.run.step.delta": "step"}
DONE_FRAME = b"event: done\ndata: [DONE]\n\n"
REORDER_WINDOW_SECONDS = 5.0
"""A project stream resumed with Last-Event-ID sends again the events of this long before that one: they reach
a stream in the broker's order (per thread), not in id order, so one with a lower id may come later. Nothing
is missed; the client skips ids it has (a run's stream, one thread, needs no window)."""
LATE_COMMIT_WINDOW_SECONDS = 60.0
"""How far back a resumed project stream replays for a transaction still open (`_reorder_floor`): its events
commit after later ids were sent. A transaction open longer than this (idle in transaction) no longer widens it."""
HEARTBEAT_FRAME = b": keep-alive\n"  # a bare comment line: a blank line after it makes the SDK parse an empty event
_REPLAY_PAGE = 500
_CATCH_UP_PAGE = 5000
"""Logged events a project stream compares with what it sent per look (every heartbeat)."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(event: str, data: Any, seq: int | None = None) -> bytes:
    """One SSE message (`id:` only for outbox events)."""
    head = f"id: {seq}\nevent: {event}\n" if seq is not None else f"event: {event}\n"
    return head.encode() + b"data: " + orjson.dumps(data) + b"\n\n"


def _search_results(step_details: Any) -> list[dict[str, Any]]:
    """The file_search results of a step's (or a step delta's) `step_details`."""
    calls = step_details.get("tool_calls") if isinstance(step_details, dict) else None
    results: list[dict[str, Any]] = []
    for call in calls if isinstance(calls, list) else ():
        found = (call.get("file_search") or {}).get("results") if isinstance(call, dict) else None
        results.extend(r for r in found or () if isinstance(r, dict))
    return results


def without_search_content(event_type: str, data: Any) -> Any:
    """A step event's payload without file_search `results[*].content`, which only `include[]` asks for (as
    on GET .../steps). The payload may be shared with other streams: it is copied when something is dropped."""
    if not event_type.startswith("thread.run.step.") or not isinstance(data, dict):
        return data
    delta = event_type == "thread.run.step.delta"

    def details(doc: dict[str, Any]) -> Any:
        return (doc.get("delta") or {}).get("step_details") if delta else doc.get("step_details")

    if not any("content" in r for r in _search_results(details(data))):
        return data
    data = copy.deepcopy(data)
    for result in _search_results(details(data)):
        result.pop("content", None)
    return data


class SeqWindow:
    """The seqs already sent on a stream (bounded), to drop what replay and live both deliver."""

    def __init__(self, size: int = 50000) -> None:
        self._order: collections.deque[int] = collections.deque()
        self._seen: set[int] = set()
        self._size = size

    def add(self, seq: int) -> bool:
        """Record `seq`; False if it was already sent."""
        if seq in self._seen:
            return False
        self._seen.add(seq)
        self._order.append(seq)
        if len(self._order) > self._size:
            self._seen.discard(self._order.popleft())
        return True

    def __contains__(self, seq: int) -> bool:
        """True if `seq` was sent (among the last `size`)."""
        return seq in self._seen


@dataclass
class RunView:
    """Which of a thread's records belong to one run's stream, and deltas kept until their object is open.

    Deltas travel on their own topic and can overtake the `*.created` and `*.in_progress` events of their
    message or step; they wait here until the `in_progress` one was sent, and are dropped once the object
    was completed (the completed object already carries the full content), so the SDK's accumulators
    always see a valid sequence.
    A delta that would arrive after its message completed is replaced by one synthesised from the
    completed text just before `thread.message.completed`, so the deltas of a message created on this
    connection always add up to its final text (as on the hosted API); a `refusal` part, which the orchestrator
    does not stream, gets its delta there too.
    """

    run_id: str
    opened: dict[str, set[str]] = field(default_factory=lambda: {"message": set(), "step": set()})
    finished: dict[str, set[str]] = field(default_factory=lambda: {"message": set(), "step": set()})
    waiting: dict[str, list[EventEnvelope]] = field(default_factory=dict)
    streamed: dict[str, dict[int, str]] = field(default_factory=dict)

    def belongs(self, envelope: EventEnvelope) -> bool:
        """True for the run's own events and deltas (by envelope run_id, else by the object's run_id)."""
        if envelope.run_id is not None:
            return envelope.run_id == self.run_id
        if envelope.type in DELTA_TYPES:
            kind = _DELTA_KIND[envelope.type]
            object_id = str(envelope.data.get("id", ""))
            return object_id in self.opened[kind] or object_id in self.finished[kind]
        return envelope.data.get("run_id") == self.run_id

    def remember(self, event_type: str, object_id: str) -> None:
        """Note opened/finished objects sent before a resume point (`Last-Event-ID`)."""
        if event_type in _OPENED:
            self.opened[_OPENED[event_type]].add(object_id)
        elif event_type in _FINISHED:
            self.finished[_FINISHED[event_type]].add(object_id)

    def close_opened(self) -> None:
        """Send no more deltas of the objects opened so far: a new stream starting at a cursor (submit_tool_outputs)
        never showed them, and the SDK fails on a delta of a step or message it has no snapshot of."""
        for kind, opened in self.opened.items():
            self.finished[kind] |= opened
            opened.clear()

    def admit(self, envelope: EventEnvelope) -> list[EventEnvelope]:
        """What to send now, in order, for this record."""
        object_id = str(envelope.data.get("id", ""))
        if envelope.type in DELTA_TYPES:
            kind = _DELTA_KIND[envelope.type]
            if object_id in self.finished[kind]:
                return []
            if object_id in self.opened[kind]:
                return self._sent([envelope])
            self.waiting.setdefault(object_id, []).append(envelope)
            return []
        self.remember(envelope.type, object_id)
        if envelope.type == "thread.message.created":
            self.streamed[object_id] = {}
        if envelope.type in _OPENED:
            return [envelope, *self._sent(self.waiting.pop(object_id, []))]
        if envelope.type in _FINISHED:
            self.waiting.pop(object_id, None)
            return [*self._missing_text(envelope), envelope]
        return [envelope]

    def _sent(self, deltas: list[EventEnvelope]) -> list[EventEnvelope]:
        """Deltas about to be sent: count the text of those of messages created on this connection, less what
        it already has (a run driven again streams its answer from the start into the same message) or
        follows text it missed (it subscribed after the first deltas)."""
        out: list[EventEnvelope] = []
        for delta in deltas:
            texts = self.streamed.get(str(delta.data.get("id", "")))
            if texts is None or delta.type != "thread.message.delta":
                out.append(delta)
                continue
            content = (delta.data.get("delta") or {}).get("content") or []
            parts = []
            for part in content:
                value = (part.get("text") or {}).get("value") if part.get("type") == "text" else None
                if isinstance(value, str) and isinstance(part.get("index"), int):
                    part = _unsent(part, texts.get(part["index"], ""), delta.text_offset)
                    if part is None:
                        continue
                    texts[part["index"]] = texts.get(part["index"], "") + part["text"]["value"]
                parts.append(part)
            if parts == content:
                out.append(delta)
            elif parts:
                out.append(delta.model_copy(update={"data": {**delta.data, "delta": {"content": parts}}}))
        return out

    @staticmethod
    def _missing_annotations(text: dict[str, Any], sent: int) -> dict[str, Any]:
        """The annotations a synthesised delta brings, as the orchestrator's own deltas do: those ending after the
        `sent` characters, each with its index in the message's list (an empty list on a part's first delta)."""
        found = text.get("annotations") or []
        missing = [{"index": index, **annotation} for index, annotation in enumerate(found)
                   if isinstance(annotation, dict) and int(annotation.get("end_index") or 0) > sent]
        return {"annotations": missing} if missing or not sent else {}

    def _missing_text(self, finished: EventEnvelope) -> list[EventEnvelope]:
        """A delta with the completed text the deltas sent so far lack (their tail arrived too late), and with
        the message's `refusal` parts."""
        texts = self.streamed.pop(str(finished.data.get("id", "")), None)
        if texts is None or finished.type not in ("thread.message.completed", "thread.message.incomplete"):
            return []
        parts = []
        for index, block in enumerate(finished.data.get("content") or []):
            if block.get("type") == "refusal":  # the orchestrator never streams a refusal: it comes whole here
                parts.append({"index": index, "type": "refusal", "refusal": block.get("refusal")})
                continue
            text = (block.get("text") or {}) if block.get("type") == "text" else {}
            full, sent = text.get("value"), texts.get(index, "")
            if isinstance(full, str) and len(full) > len(sent) and full.startswith(sent):
                parts.append({"index": index, "type": "text",
                              "text": {"value": full[len(sent):], **self._missing_annotations(text, len(sent))}})
        if not parts:
            return []
        return [EventEnvelope(type="thread.message.delta", project_id=finished.project_id, key=finished.key,
                              thread_id=finished.thread_id, run_id=finished.run_id,
                              data={"id": finished.data["id"], "object": "thread.message.delta",
                                    "delta": {"content": parts}})]


def _unsent(part: dict[str, Any], sent: str, offset: int | None) -> dict[str, Any] | None:
    """A text part less what the client has of its text (`sent`); `offset`: where the part starts in that text
    (None: right after `sent`). None when nothing is new, or when the client missed text before the part: the
    completed message then brings the rest (`_missing_text`), so what the client accumulates stays a prefix."""
    start = len(sent) if offset is None else offset
    text = part["text"]
    if start > len(sent) or start + len(text["value"]) <= len(sent):
        return None
    if start == len(sent):
        return part
    annotations = [a for a in text.get("annotations") or [] if int(a.get("end_index") or 0) > len(sent)]
    return {**part, "text": {"value": text["value"][len(sent) - start:],
                             **({"annotations": annotations} if annotations else {})}}


MAX_EVENT_ID = 2**63 - 1
"""Event ids are Postgres bigints: a larger cursor is no id (and could not be queried)."""


def _parse_cursor(last_event_id: str | None, after: str | None) -> int | None:
    raw = last_event_id if last_event_id not in (None, "") else after
    if raw is None or raw == "":
        return None
    digits = raw.strip()
    if digits.startswith("-") and digits[1:].isascii() and digits[1:].isdigit():
        raise bad_request("Invalid Last-Event-ID: must not be negative.", "Last-Event-ID", "invalid_value")
    # ASCII digits only (int() also takes '1_0', '+1' and other scripts' digits); ids are bigints
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19 or int(digits) > MAX_EVENT_ID:
        raise bad_request(f"Invalid Last-Event-ID: '{echo(raw)}'. Expected the id of an event received on this stream.",
                          "Last-Event-ID", "invalid_value")
    return int(digits)


async def _check_cursor_exists(pool: asyncpg.Pool, cursor: int | None) -> None:
    """A Last-Event-ID beyond the event log was never sent: resuming after it would skip every event to come."""
    if cursor is not None and cursor > int(await pool.fetchval("SELECT coalesce(max(seq), 0) FROM events")):
        raise bad_request(f"Invalid Last-Event-ID: '{cursor}' is after the last event. Expected the id of an event "
                          "received on this stream.", "Last-Event-ID", "invalid_value")


async def run_cursor(conn: Conn, run_id: str) -> int:
    """The seq of the run's latest event: pass it as `after_seq` to stream only what follows (submit tool outputs)."""
    value = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events WHERE run_id = $1 AND topic = $2",
                                run_id, EVENTS)
    return int(value or 0)


async def _replay_run(conn: Conn, *, thread_id: str, run_id: str, after_seq: int,
                      include_thread_created: bool) -> list[tuple[int, EventEnvelope]]:
    rows = await conn.fetch(
        "SELECT seq, envelope FROM events WHERE run_id = $1 AND topic = $2 AND seq > $3"
        " UNION ALL"
        " SELECT seq, envelope FROM events WHERE $5 AND thread_id = $4 AND type = 'thread.created' AND topic = $2"
        "   AND run_id IS NULL AND seq > $3"
        " ORDER BY seq", run_id, EVENTS, after_seq, thread_id, include_thread_created)
    return [(r["seq"], EventEnvelope.model_validate(r["envelope"])) for r in rows]


async def _prime(conn: Conn, view: RunView, run_id: str, after_seq: int) -> bool:
    """Before resuming after `after_seq`: note what the client saw created or finished; True if the run ended."""
    rows = await conn.fetch(
        "SELECT type, envelope->'data'->>'id' AS object_id FROM events WHERE run_id = $1 AND topic = $2"
        " AND seq <= $3 AND type = ANY($4::text[])", run_id, EVENTS, after_seq,
        [*_OPENED, *_FINISHED, *TERMINAL_RUN_EVENTS])
    for row in rows:
        view.remember(row["type"], row["object_id"] or "")
    return any(row["type"] in TERMINAL_RUN_EVENTS for row in rows)


async def _terminal_run(conn: Conn, run_id: str) -> dict[str, Any] | None:
    """The run as the API shows it if it has ended, else None."""
    row = await conn.fetchrow("SELECT doc, as_sent FROM runs WHERE id = $1 AND status = ANY($2::text[])", run_id,
                              _TERMINAL_STATUSES)
    return with_as_sent(row["doc"], row["as_sent"]) if row is not None else None


def _gone_frame(thread_id: str, run_id: str) -> bytes:
    """An `error` event for a run deleted with its thread (the SDK raises APIError with its message)."""
    return frame("error", {"error": {"message": f"Run '{run_id}' no longer exists: its thread '{thread_id}' was "
                                                "deleted.", "type": "invalid_request_error", "param": None,
                                     "code": None}})


def _cut_short_frame(thread_id: str, run_id: str, *, stopping: bool) -> bytes:
    """An `error` event for a run stream that ends before its run (the gateway is stopping, or the client fell too far
    behind): the SDK raises APIError rather than take the end for the run's; other clients resume with Last-Event-ID."""
    why = "this gateway is shutting down" if stopping else "the client fell too far behind"
    return frame("error", {"error": {
        "message": f"The stream of run '{run_id}' ended before the run did ({why}). Follow the rest from GET "
                   f"/v1/threads/{thread_id}/runs/{run_id}/events with the last event id received as Last-Event-ID.",
        "type": "server_error", "param": None, "code": "stream_interrupted"}})


async def _run_exists(pool: asyncpg.Pool, run_id: str) -> bool:
    """Whether the run was not deleted with its thread. Without a database (an outage) it is taken to exist: the
    stream keeps following the broker (a cut stream would end an SDK client's iteration as if the run were done),
    and the next idle beat asks again."""
    try:
        return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1)", run_id))
    except Exception as error:
        if not database_lost(error):
            raise
        _log.warning("the database is unavailable; the stream of run %s goes on from the broker: %r", run_id, error)
        return True


async def _missed_in_log(pool: asyncpg.Pool, seen: SeqWindow, *, run_id: str, after_seq: int,
                         before_seq: int = MAX_EVENT_ID) -> list[tuple[int, EventEnvelope]]:
    """The run's logged events (after `after_seq`, before `before_seq`) this stream has not sent: the broker can lose
    acknowledged records (a restarted in-memory broker), and then only the event log has them. Their ids are
    compared first (the usual answer is none); nothing during a database outage (the next idle beat asks again)."""
    try:
        async with pool.acquire() as conn:
            logged = await conn.fetch("SELECT seq FROM events WHERE run_id = $1 AND topic = $2 AND seq > $3"
                                      " AND seq < $4", run_id, EVENTS, after_seq, before_seq)
            missing = sorted(row["seq"] for row in logged if row["seq"] not in seen)
            if not missing:
                return []
            rows = await conn.fetch("SELECT seq, envelope FROM events WHERE seq = ANY($1::bigint[]) ORDER BY seq",
                                    missing)
    except Exception as error:
        if not database_lost(error):
            raise
        return []
    return [(row["seq"], EventEnvelope.model_validate(row["envelope"])) for row in rows]


_UNASKED = tuple(sorted(DELTA_TYPES))
"""Event types a project stream without `types` leaves out (its live path never has them, `Subscription.wants`): its
replay and catch-up from the log leave them out too, or a stream got every step delta ~5 s late, out of id order, and
lost some for good to a disconnect (they sat below the resumed stream's reorder window)."""


async def _missed_in_project_log(pool: asyncpg.Pool, seen: SeqWindow, *, project_id: str,
                                 types: list[str] | None, cursor: int) -> tuple[list[tuple[int, EventEnvelope]], int]:
    """The project's events logged after `cursor` and more than `REORDER_WINDOW_SECONDS` ago that this stream has
    not sent (what a broker that lost acknowledged records never brought), and the cursor to look from next time.

    Younger events are left to the live path (and the next look), so a logged event never overtakes its thread's
    live ones. Nothing during a database outage (the next look asks again)."""
    try:
        async with pool.acquire() as conn:
            logged = await conn.fetch(
                "SELECT seq FROM events WHERE project_id = $1 AND topic = $2 AND seq > $3"
                " AND occurred_at < now() - make_interval(secs => $4)"
                " AND ($5::text[] IS NULL OR type = ANY($5::text[])) AND ($5::text[] IS NOT NULL OR type <> ALL($7))"
                " ORDER BY seq LIMIT $6",
                project_id, EVENTS, cursor, REORDER_WINDOW_SECONDS, types, _CATCH_UP_PAGE, _UNASKED)
            if not logged:
                return [], cursor
            missing = [row["seq"] for row in logged if row["seq"] not in seen]
            rows = await conn.fetch("SELECT seq, envelope FROM events WHERE seq = ANY($1::bigint[]) ORDER BY seq",
                                    missing) if missing else []
    except Exception as error:
        if not database_lost(error):
            raise
        return [], cursor
    return [(row["seq"], EventEnvelope.model_validate(row["envelope"])) for row in rows], logged[-1]["seq"]


async def _next(sub: Subscription, heartbeat: float) -> EventEnvelope | None:
    """The next record, or None after `heartbeat` idle seconds (or once the subscription was closed)."""
    try:
        return await asyncio.wait_for(sub.queue.get(), heartbeat)
    except TimeoutError:
        return None


async def _run_frames(pool: asyncpg.Pool, fanout: EventFanout, *, thread_id: str, run_id: str, after_seq: int,
                      include_thread_created: bool, stop_on_requires_action: bool, search_content: bool,
                      heartbeat: float, resumed: bool) -> AsyncIterator[bytes]:
    """Subscribe, replay from the event log, then follow live until the run ends (or pauses)."""
    ends = TERMINAL_RUN_EVENTS | ({PAUSE_RUN_EVENT} if stop_on_requires_action else frozenset())

    def payload(out: EventEnvelope) -> Any:
        return out.data if search_content else without_search_content(out.type, out.data)

    sub = await fanout.subscribe(thread_id=thread_id)
    view = RunView(run_id)
    seen = SeqWindow()

    def from_log(logged: list[tuple[int, EventEnvelope]]) -> tuple[list[bytes], bool]:
        """The frames of logged events, up to the run's end (then `done` too, and True)."""
        frames: list[bytes] = []
        for seq, past in logged:
            seen.add(seq)
            frames += [frame(out.type, payload(out), seq if out is past else None) for out in view.admit(past)]
            if past.type in ends:
                return [*frames, DONE_FRAME], True
        return frames, False

    try:
        async with pool.acquire() as conn:
            if after_seq and await _prime(conn, view, run_id, after_seq):
                yield DONE_FRAME  # the client already has the run's last event
                return
            if not resumed:
                view.close_opened()
            ended = await _terminal_run(conn, run_id)  # read first: its terminal event is in the replay, if kept
            replay = await _replay_run(conn, thread_id=thread_id, run_id=run_id, after_seq=after_seq,
                                       include_thread_created=include_thread_created)
        sent, over = from_log(replay)
        for out_frame in sent:
            yield out_frame
        if over:
            return
        if ended is not None:  # its events are past THREADLINE_EVENT_RETENTION_DAYS: no terminal event will come
            yield frame(f"thread.run.{ended['status']}", ended)
            yield DONE_FRAME
            return
        while True:
            envelope = await _next(sub, heartbeat)
            if envelope is None:
                if sub.overflowed or sub.closed:  # closed: the gateway is stopping; no `done`, the run goes on
                    yield _cut_short_frame(thread_id, run_id, stopping=sub.closed)
                    return
                if not await _run_exists(pool, run_id):
                    yield _gone_frame(thread_id, run_id)  # its thread was deleted: no terminal event will come
                    yield DONE_FRAME
                    return
                sent, over = from_log(await _missed_in_log(pool, seen, run_id=run_id, after_seq=after_seq))
                for out_frame in sent:
                    yield out_frame
                if over:
                    return
                yield HEARTBEAT_FRAME
                continue
            live_seq = envelope.sequence
            if live_seq is not None and (live_seq <= after_seq or not seen.add(live_seq)):
                continue
            if not view.belongs(envelope):
                continue
            if envelope.type in ends:  # first what the broker lost before the run's end, from the log
                sent, over = from_log(await _missed_in_log(pool, seen, run_id=run_id, after_seq=after_seq,
                                                           before_seq=live_seq or MAX_EVENT_ID))
                for out_frame in sent:
                    yield out_frame
                if over:
                    return
            for out in view.admit(envelope):
                yield frame(out.type, payload(out), out.sequence)
            if envelope.type in ends:
                yield DONE_FRAME
                return
            if sub.overflowed and sub.queue.empty():  # the client fell too far behind
                yield _cut_short_frame(thread_id, run_id, stopping=False)
                return
    finally:
        fanout.unsubscribe(sub)


async def _reorder_floor(conn: Conn, project_id: str, after_seq: int) -> int:
    """Where a resumed project stream replays from: the project's newest event older than `REORDER_WINDOW_SECONDS`
    before the event `after_seq` (walking back from it on the project's index), or `after_seq` if unknown.

    A transaction still open took its events' ids when it wrote them and shows them only at its commit, after
    later ids were sent: the window also reaches back to the start of the oldest transaction writing now (at most
    `LATE_COMMIT_WINDOW_SECONDS`), or its events would come below the floor and be skipped for good. Another
    project's event is unknown here: its time would tell that it exists, and when."""
    floor = await conn.fetchval(
        "WITH s AS (SELECT occurred_at FROM events WHERE seq = $2 AND project_id = $1),"
        " writing AS (SELECT min(xact_start) AS since FROM pg_stat_activity"
        " WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid())"
        " SELECT coalesce((SELECT seq FROM events WHERE project_id = $1 AND seq <= $2 AND occurred_at <"
        " least(s.occurred_at, greatest(coalesce(writing.since, s.occurred_at),"
        " s.occurred_at - make_interval(secs => $4))) - make_interval(secs => $3) ORDER BY seq DESC LIMIT 1),"
        " CASE WHEN s.occurred_at IS NOT NULL THEN 0 ELSE $2 END)"
        " FROM writing LEFT JOIN s ON true",
        project_id, after_seq, REORDER_WINDOW_SECONDS, LATE_COMMIT_WINDOW_SECONDS)
    return int(floor)


async def _project_frames(pool: asyncpg.Pool, fanout: EventFanout, *, project_id: str, types: frozenset[str] | None,
                          after_seq: int | None, heartbeat: float) -> AsyncIterator[bytes]:
    """Subscribe to the project, replay what was missed (if resuming), then follow live.

    Live records at or below the starting point are older than the stream and skipped: a new stream (no
    `Last-Event-ID`) starts after the last event committed when it subscribed. The fan-out may hand it a few
    older records (it starts where the broker says a partition ends, which tansu says a little early).
    A resumed stream starts `REORDER_WINDOW_SECONDS` before `after_seq`: the events of different threads come
    in the broker's order, not their ids', so some with lower ids may have come after it.
    Every `heartbeat` the stream also sends from the event log what the broker never brought (lost records)."""
    sub = await fanout.subscribe(project_id=project_id, types=types)
    seen = SeqWindow()
    logged_types = sorted(t for t in types if t not in DELTA_TYPES) if types is not None else None
    try:
        if after_seq is None:
            async with pool.acquire() as conn:
                floor = cursor = int(await conn.fetchval("SELECT COALESCE(max(seq), 0) FROM events"))
        else:
            async with pool.acquire() as conn:
                floor = cursor = await _reorder_floor(conn, project_id, after_seq)
            while True:
                async with pool.acquire() as conn:
                    rows = await conn.fetch(
                        "SELECT seq, envelope FROM events WHERE project_id = $1 AND topic = $2 AND seq > $3"
                        " AND ($4::text[] IS NULL OR type = ANY($4::text[])) AND ($4::text[] IS NOT NULL"
                        " OR type <> ALL($6)) ORDER BY seq LIMIT $5",
                        project_id, EVENTS, cursor, logged_types, _REPLAY_PAGE, _UNASKED)
                for row in rows:
                    past = EventEnvelope.model_validate(row["envelope"])
                    seen.add(row["seq"])
                    cursor = row["seq"]
                    yield frame(past.type, past.data, row["seq"])
                if len(rows) < _REPLAY_PAGE:
                    break
        loop = asyncio.get_running_loop()
        next_look = loop.time() + heartbeat
        while True:
            envelope = await _next(sub, heartbeat)
            if loop.time() >= next_look:
                next_look = loop.time() + heartbeat
                missed, cursor = await _missed_in_project_log(pool, seen, project_id=project_id, types=logged_types,
                                                              cursor=cursor)
                for seq, past in missed:
                    seen.add(seq)
                    yield frame(past.type, past.data, seq)
            if envelope is None:
                if sub.overflowed or sub.closed:
                    return
                yield HEARTBEAT_FRAME
                continue
            if envelope.sequence is not None and (envelope.sequence <= floor or not seen.add(envelope.sequence)):
                continue
            yield frame(envelope.type, envelope.data, envelope.sequence)
            if sub.overflowed and sub.queue.empty():
                return
    finally:
        fanout.unsubscribe(sub)


def _sse(frames: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)


async def run_event_stream(request: Request, *, project_id: str, thread_id: str, run_id: str,
                           after_seq: int | None = None, include_thread_created: bool = False,
                           stop_on_requires_action: bool = True, search_content: bool = True,
                           resumed: bool = True) -> StreamingResponse:
    """The SSE response for `stream: true` (call after the transaction that created/changed the run committed).

    - create run: `run_event_stream(request, project_id=..., thread_id=..., run_id=run.id)`
    - create thread and run: add `include_thread_created=True` (the stream starts with `thread.created`)
    - submit tool outputs: `after_seq=await run_cursor(conn, run_id)` read before committing the submission,
      so the stream starts with what the submission caused, and `resumed=False`: late deltas of steps and
      messages opened before it (on the run's earlier stream) are not sent.
    - `resumed=True` (default): a client resuming at `after_seq` (Last-Event-ID) has what it was sent before.
    - `search_content=False`: step events without file_search `results[*].content` (the hosted API sends it
      only when create-run's `include[]` asks for it; a submit_tool_outputs stream follows the run's stored
      `include[]`).
    """
    settings: GatewaySettings = request.app.state.settings
    frames = _run_frames(request.app.state.runtime.pool, request.app.state.fanout, thread_id=thread_id,
                         run_id=run_id, after_seq=after_seq or 0, include_thread_created=include_thread_created,
                         stop_on_requires_action=stop_on_requires_action, search_content=search_content,
                         heartbeat=settings.sse_heartbeat_seconds, resumed=resumed)
    return _sse(frames)


LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]
TypesQuery = Annotated[list[str] | None, Query()]


@router.get("/threads/{thread_id}/runs/{run_id}/events")
async def subscribe_run(thread_id: str, run_id: str, request: Request, caller: CallerDep, pool: PoolDep,
                        last_event_id: LastEventId = None,
                        after: Annotated[str | None, Query()] = None) -> StreamingResponse:
    """Follow an existing run: its events so far (or after Last-Event-ID), then live, until it ends."""
    cursor = _parse_cursor(last_event_id, after)
    async with pool.acquire() as conn:
        found = await conn.fetchval("SELECT 1 FROM runs WHERE id = $1 AND thread_id = $2 AND project_id = $3",
                                    run_id, thread_id, caller.project_id)
    if found is None:
        raise await missing_in_thread(pool, caller.project_id, thread_id, "run", run_id)
    await _check_cursor_exists(pool, cursor)
    return await run_event_stream(request, project_id=caller.project_id, thread_id=thread_id, run_id=run_id,
                                  after_seq=cursor, stop_on_requires_action=False)


def _types(values: Iterable[str] | None) -> frozenset[str] | None:
    """The `types=` filter (comma-separated, repeatable); a type no event has is a 400, not a silent nothing."""
    if not values:
        return None
    types = frozenset(t.strip() for value in values for t in value.split(",") if t.strip())
    if unknown := sorted(types - PUBLIC_EVENT_TYPES):
        raise bad_request(f"Invalid value: '{echo(unknown[0])}'. Supported values are the event types of "
                          f"`GET /v1/events`, e.g. 'thread.run.completed' or 'thread.message.delta'.",
                          "types", "invalid_value")
    return types or None


@router.get("/events")
async def subscribe_project(request: Request, caller: CallerDep, last_event_id: LastEventId = None,
                            after: Annotated[str | None, Query()] = None,
                            types: TypesQuery = None) -> StreamingResponse:
    """Every public event of the project (optionally `types=a,b`), live; resumable with Last-Event-ID."""
    cursor = _parse_cursor(last_event_id, after)
    await _check_cursor_exists(request.app.state.runtime.pool, cursor)
    settings: GatewaySettings = request.app.state.settings
    frames = _project_frames(request.app.state.runtime.pool, request.app.state.fanout, project_id=caller.project_id,
                             types=_types(types), after_seq=cursor, heartbeat=settings.sse_heartbeat_seconds)
    return _sse(frames)
