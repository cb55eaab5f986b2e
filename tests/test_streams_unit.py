"""Unit tests (no stack) of a run stream: deltas wait until their message or step is in progress; a database outage
is waited out."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.api.streams import DONE_FRAME, HEARTBEAT_FRAME, RunView, _run_frames
from gateway.fanout import Subscription
from threadline_core.events import EventEnvelope

RUN, THREAD = "run_unit", "thread_unit"


def envelope(event_type: str, object_id: str, **data: Any) -> EventEnvelope:
    return EventEnvelope(type=event_type, project_id="proj_unit", key=THREAD, thread_id=THREAD, run_id=RUN,
                         data={"id": object_id, **data})


def text_delta(message_id: str, value: str, offset: int | None = None, **text: Any) -> EventEnvelope:
    delta = envelope("thread.message.delta", message_id, object="thread.message.delta",
                     delta={"content": [{"index": 0, "type": "text", "text": {"value": value, **text}}]})
    delta.text_offset = offset
    return delta


def sent(view: RunView, records: list[EventEnvelope]) -> list[str]:
    return [out.type for record in records for out in view.admit(record)]


def test_message_deltas_wait_for_in_progress() -> None:
    view = RunView(run_id=RUN)
    order = sent(view, [envelope("thread.message.created", "msg_1"), text_delta("msg_1", "Hel"),
                        text_delta("msg_1", "lo"), envelope("thread.message.in_progress", "msg_1"),
                        text_delta("msg_1", "!"),
                        envelope("thread.message.completed", "msg_1",
                                 content=[{"type": "text", "text": {"value": "Hello!", "annotations": []}}])])
    assert order == ["thread.message.created", "thread.message.in_progress", "thread.message.delta",
                     "thread.message.delta", "thread.message.delta", "thread.message.completed"]


def test_step_deltas_wait_for_in_progress() -> None:
    view = RunView(run_id=RUN)
    delta = envelope("thread.run.step.delta", "step_1", object="thread.run.step.delta",
                     delta={"step_details": {"type": "tool_calls", "tool_calls": [{"index": 0, "type": "function"}]}})
    order = sent(view, [delta, envelope("thread.run.step.created", "step_1"),
                        envelope("thread.run.step.in_progress", "step_1")])
    assert order == ["thread.run.step.created", "thread.run.step.in_progress", "thread.run.step.delta"]


def test_resumed_stream_knows_what_was_opened_before() -> None:
    view = RunView(run_id=RUN)
    view.remember("thread.message.created", "msg_1")
    assert sent(view, [text_delta("msg_1", "x")]) == []  # created alone does not open it
    view = RunView(run_id=RUN)
    view.remember("thread.message.in_progress", "msg_1")
    assert sent(view, [text_delta("msg_1", "x")]) == ["thread.message.delta"]


def test_synthesised_delta_brings_the_annotations_it_covers() -> None:
    """Deltas that came too late are replaced by one from the completed text: with that text's citations."""
    cite = {"type": "file_citation", "text": "【0:0†a.txt】", "start_index": 8, "end_index": 19,
            "file_citation": {"file_id": "file-a"}}
    early = {**cite, "text": "【0:1†a.txt】", "start_index": 0, "end_index": 3}
    completed = envelope("thread.message.completed", "msg_1", content=[
        {"type": "text", "text": {"value": "abc defg【0:0†a.txt】", "annotations": [early, cite]}}])
    view = RunView(run_id=RUN)
    out = [o for r in [envelope("thread.message.created", "msg_1"), envelope("thread.message.in_progress", "msg_1"),
                       text_delta("msg_1", "abc "), completed] for o in view.admit(r)]
    [synthesised] = [o for o in out if o.type == "thread.message.delta"][1:]
    assert synthesised.data["delta"]["content"] == [
        {"index": 0, "type": "text", "text": {"value": "defg【0:0†a.txt】", "annotations": [{"index": 1, **cite}]}}]
    view = RunView(run_id=RUN)
    out = [o for r in [envelope("thread.message.created", "msg_1"), envelope("thread.message.in_progress", "msg_1"),
                       completed] for o in view.admit(r)]
    [whole] = [o for o in out if o.type == "thread.message.delta"]
    assert whole.data["delta"]["content"][0]["text"]["annotations"] == [{"index": 0, **early}, {"index": 1, **cite}]


def test_an_answer_streamed_again_is_sent_once() -> None:
    """A run driven again (its orchestrator stopped mid-answer) streams its text from the start into the same
    message: a client that stayed connected gets only what it lacks, with the citations it has not had."""
    cite = {"type": "file_citation", "text": "【0:0†a.txt】", "start_index": 11, "end_index": 22, "index": 0,
            "file_citation": {"file_id": "file-a"}}
    view = RunView(run_id=RUN)
    out = [o for r in [envelope("thread.message.created", "msg_1"), envelope("thread.message.in_progress", "msg_1"),
                       text_delta("msg_1", "Hel", 0, annotations=[]), text_delta("msg_1", "lo", 3),
                       text_delta("msg_1", "He", 0, annotations=[]), text_delta("msg_1", "llo wo", 2),
                       text_delta("msg_1", "rld【0:0†a.txt】", 8, annotations=[cite]), text_delta("msg_1", "!", 22),
                       envelope("thread.message.completed", "msg_1", content=[
                           {"type": "text", "text": {"value": "Hello world【0:0†a.txt】!", "annotations": [cite]}}])]
           for o in view.admit(r)]
    parts = [o.data["delta"]["content"] for o in out if o.type == "thread.message.delta"]
    assert [p[0]["text"]["value"] for p in parts] == ["Hel", "lo", " wo", "rld【0:0†a.txt】", "!"]
    assert parts[3][0]["text"]["annotations"] == [cite]
    assert "annotations" not in parts[2][0]["text"]  # the first delta had the list
    assert out[-1].type == "thread.message.completed"


def test_text_after_a_gap_waits_for_the_completed_message() -> None:
    """A client that subscribed after a message's first delta gets its text whole at completion, not a tail of it
    (the SDK's accumulated text would lack the start for good)."""
    view = RunView(run_id=RUN)
    out = [o for r in [envelope("thread.message.created", "msg_1"), envelope("thread.message.in_progress", "msg_1"),
                       text_delta("msg_1", "lo", 3), text_delta("msg_1", " you", 5),
                       envelope("thread.message.completed", "msg_1", content=[
                           {"type": "text", "text": {"value": "Hello you", "annotations": []}}])]
           for o in view.admit(r)]
    deltas = [o.data["delta"]["content"][0]["text"]["value"] for o in out if o.type == "thread.message.delta"]
    assert deltas == ["Hello you"]


class _OneThreadFanout:
    """The fan-out of one thread: the test puts records into the stream's subscription itself."""

    def __init__(self) -> None:
        self.sub = Subscription(thread_id=THREAD, project_id=None, types=None, maxsize=10)

    async def subscribe(self, *, thread_id: str) -> Subscription:
        assert thread_id == THREAD
        return self.sub

    def unsubscribe(self, sub: Subscription) -> None:
        assert sub is self.sub


class _FailingPool:
    """A pool whose run has no events yet and whose existence checks fail with `errors`, one per check."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.checks = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator["_FailingPool"]:
        yield self

    async def fetch(self, *_: Any) -> list[Any]:
        return []

    async def fetchrow(self, *_: Any) -> None:
        return None  # (the run has not ended)

    async def fetchval(self, *_: Any) -> bool:
        self.checks += 1
        if self.errors:
            raise self.errors.pop(0)
        return True


@pytest.mark.parametrize("outage", [ConnectionRefusedError("refused"), asyncpg.CannotConnectNowError("starting up"),
                                    asyncpg.InternalClientError("cannot switch to state 12")],
                         ids=["refused", "starting-up", "farewell"])
async def test_a_run_stream_goes_on_through_a_database_outage(outage: Exception) -> None:
    """The chaos trial killed Postgres under idle run streams: the existence check of the idle beat failed and cut
    each stream with an error logged. The stream keeps beating and then delivers the run's end from the broker."""
    fanout, pool = _OneThreadFanout(), _FailingPool([outage, outage])
    frames = _run_frames(pool, fanout, thread_id=THREAD, run_id=RUN, after_seq=0,
                         include_thread_created=False, stop_on_requires_action=False, search_content=True,
                         heartbeat=0.01, resumed=True)
    got = [await anext(frames), await anext(frames)]
    assert got == [HEARTBEAT_FRAME, HEARTBEAT_FRAME] and pool.checks == 2
    completed = envelope("thread.run.completed", RUN, object="thread.run", status="completed")
    completed.sequence = 7
    fanout.sub.offer(completed)
    rest = [frame async for frame in frames if frame != HEARTBEAT_FRAME]
    assert rest[0].startswith(b"id: 7\nevent: thread.run.completed\n") and rest[1:] == [DONE_FRAME]


async def test_a_run_stream_does_not_hide_other_errors() -> None:
    """Only an outage is waited out: any other error of the check still ends the stream (and is logged)."""
    frames = _run_frames(_FailingPool([ValueError("bug")]), _OneThreadFanout(),
                         thread_id=THREAD, run_id=RUN, after_seq=0, include_thread_created=False,
                         stop_on_requires_action=False, search_content=True, heartbeat=0.01, resumed=True)
    with pytest.raises(ValueError, match="bug"):
        await asyncio.wait_for(anext(frames), 5)


class _LoggedPool:
    """A pool whose event log holds `logged` (seq -> envelope) once the stream follows the broker (its replay at the
    start finds nothing), and whose run has not ended."""

    def __init__(self, logged: dict[int, EventEnvelope]) -> None:
        self.logged = logged

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator["_LoggedPool"]:
        yield self

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if query.startswith("SELECT seq FROM events WHERE run_id"):
            _, _, after, before = args
            return [{"seq": seq} for seq in self.logged if after < seq < before]
        if query.startswith("SELECT seq, envelope FROM events WHERE seq = ANY"):
            return [{"seq": seq, "envelope": self.logged[seq].model_dump(mode="json")} for seq in args[0]]
        return []

    async def fetchrow(self, *_: Any) -> None:
        return None

    async def fetchval(self, *_: Any) -> bool:
        return True


async def test_a_run_stream_sends_what_the_broker_lost_before_the_run_ends() -> None:
    """The broker brings the run's terminal event but lost an event before it (a restarted in-memory broker): the
    stream takes that one from the event log, in order, before the end."""
    step = envelope("thread.run.step.created", "step_1", object="thread.run.step")
    step.sequence = 5
    completed = envelope("thread.run.completed", RUN, object="thread.run", status="completed")
    completed.sequence = 7
    fanout = _OneThreadFanout()
    frames = _run_frames(_LoggedPool({5: step, 7: completed}), fanout, thread_id=THREAD, run_id=RUN, after_seq=0,
                         include_thread_created=False, stop_on_requires_action=False, search_content=True,
                         heartbeat=5, resumed=True)
    fanout.sub.offer(completed)
    got = await asyncio.wait_for(_all(frames), 5)
    assert [f.split(b"\n", 2)[:2] for f in got[:2]] == [[b"id: 5", b"event: thread.run.step.created"],
                                                        [b"id: 7", b"event: thread.run.completed"]]
    assert got[2:] == [DONE_FRAME]


async def _all(frames: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in frames]
