"""Driving runs: claim, prompt, stream the model, write the outcome; leases, sweeping and cancellation.

Every state change is one transaction that also appends its public events to the outbox. A run is
driven by whoever holds its lease (`lease_owner`, renewed while driving); claims are conditional on
the row's state under a row lock, so a redelivered or duplicated command changes nothing and two
instances never drive the same run. The run is always continued from what the database says, so
any instance can pick it up after a tool call, a submission or a crash.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from run_orchestrator import repository as repo
from run_orchestrator.metrics import OrchestratorMetrics
from run_orchestrator.model import ContextOverflow, ModelClient, ModelError, ModelTurn, PartialCall
from run_orchestrator.objects import (
    event,
    event_without_data,
    events_for,
    image_parts,
    new_message,
    new_message_step,
    new_tool_calls_step,
    refusal_content,
    text_content,
    with_tool_calls,
)
from run_orchestrator.prompt import (
    Prompt,
    allowed_calls,
    build_prompt,
    can_call_tools,
    chat_request,
    code_files_note,
    code_input_ids,
    forces_tool_call,
    image_file_ids,
    made_tool_call,
    tool_call_reminder,
    with_image_files,
)
from run_orchestrator.repository import Conn, RunRow, StepRow
from run_orchestrator.server_tools import call_deltas, done_calls, keep_streamed, streamed
from run_orchestrator.settings import RunOrchestratorSettings
from run_orchestrator.tools import (
    GeneratedFiles,
    ModelToolCall,
    apply_server_result,
    dispatch_server_tool,
    generated_files,
    pending_function_calls,
    pending_server_calls,
    required_action,
    server_tool_types,
    split_tool_calls,
    step_tool_call,
    tool_request,
    tool_state,
    written_tool_call,
)
from threadline_core.db import claim_event, database_lost
from threadline_core.events import EventEnvelope, RunRequested, ToolCallCompleted
from threadline_core.ids import now_seconds
from threadline_core.kafka import DATA_ERRORS
from threadline_core.metrics import ServiceMetrics
from threadline_core.outbox import MAX_EVENT_BYTES, EventTooLarge, append_events, ensure_room
from threadline_core.topics import EVENTS, MESSAGE_DELTAS, RUN_COMMANDS
from threadline_core.usage import add_usage
from threadline_search.citations import annotate_content, delta_annotations, open_marker_length
from threadline_search.store import expired_stores_message

CONSUMER_NAME = "run-orchestrator"
_SWEEP_BATCH = 100
_CONTENT_BUDGET = MAX_EVENT_BYTES - 64 * 1024
"""Most bytes of JSON an answer's content may take: the rest of its message's event (metadata, ids) fits in
what is left of the outbox's limit."""
_DELTA_CHARS = 64 * 1024
"""Most characters of text in one delta (6 bytes of JSON each at worst): a Kafka message has a size limit."""
_log = logging.getLogger(__name__)


def _server_error() -> dict[str, str]:
    """The run's `last_error` for a failure of ours (a new dict each time: the run's doc keeps it)."""
    return {"code": "server_error", "message": "The server had an error while processing the run."}


STEP_ERROR_CODES = frozenset({"server_error", "rate_limit_exceeded"})
"""The codes a run step's `last_error` may have (a run's may also be `invalid_prompt`)."""


def _step_error(run_error: dict[str, str] | None) -> dict[str, str] | None:
    """The `last_error` of a step that failed with its run: the run's, as `server_error` if its code is not a
    step's (a step holding `invalid_prompt` could not be recorded, and the run would never fail)."""
    if run_error is None or run_error["code"] in STEP_ERROR_CODES:
        return run_error
    return {**run_error, "code": "server_error"}


class _MessageDeleted(LookupError):
    """The message the run was writing its answer into was deleted meanwhile: the run fails, saying so."""

    def __init__(self, message_id: str | None) -> None:
        super().__init__(f"The run's message {message_id} was deleted while the run was in progress.")


class _Abandon(Exception):
    """The run is no longer ours to write (cancelled, expired or taken over)."""


@dataclass
class Turn:
    """A claimed run on its way to (or back from) the model."""

    run: RunRow
    request: dict[str, Any]
    prior_usage: dict[str, int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    """The run's steps before this turn (file_search results become the answer's citations)."""
    prompt_for: Callable[..., Prompt] | None = None
    """The turn's prompt built for a context length (`context_tokens=`), to cut it again for a model that refused it
    (None: a request not built from the thread)."""
    prompt_tokens: int = 0
    """The estimated tokens of the prompt in `request`."""
    started_stores: list[str] = field(default_factory=list)
    """The live vector stores of a run that started with this turn: they were active now (`_touch_stores`)."""
    reminders: list[dict[str, Any]] = field(default_factory=list)
    """What `request` holds after the prompt (`tool_call_reminder`): a prompt cut to fit keeps it."""
    dropped_usage: dict[str, int] | None = None
    """The usage of a held answer dropped to ask again (`_call_model`): spent all the same, the run counts it whatever
    the next call does."""
    called: bool = False
    """The run made a tool call in an earlier turn: a forced tool_choice is over (`prompt.turn_tool_choice`)."""
    held: bool = False
    """The model's text is not shown (no message opens for it): the run forces a tool call and this answer may still
    make one (`_call_model` asks again, or the text is the answer, written whole)."""
    message_id: str | None = None
    step_id: str | None = None
    message_doc: dict[str, Any] | None = None
    step_doc: dict[str, Any] | None = None
    """The answer's message and step as they were opened (None: the message vanished)."""
    generated: GeneratedFiles = field(default_factory=lambda: GeneratedFiles(images=[], paths={}))
    """The run's code_interpreter files: images shown in the answer, paths its links get annotated for."""
    images_streamed: bool = False
    """The answer's `image_file` parts were announced by a delta (with its first text, or alone)."""
    text: str = ""
    unsent: list[str] = field(default_factory=list)
    next_flush: float = 0.0
    """When (time.monotonic) the next delta may be published at once."""
    pump: asyncio.Task[None] | None = None
    """The pending publication of coalesced text."""
    pumped: asyncio.Future[None] | None = None
    """The pump's flush in flight: stopping the pump waits for it (a write cut short after its commit would leave
    the turn not knowing what it wrote: a step opened twice, pieces sent twice)."""
    calls: dict[int, PartialCall] = field(default_factory=dict)
    """The tool calls the model is writing, by its index."""
    calls_dirty: bool = False
    """Some call grew since the last flush."""
    call_step: dict[str, Any] | None = None
    """The tool_calls step opened while the model writes its calls, as last written."""
    calls_sent: dict[str, int] = field(default_factory=dict)
    """Of each call in `call_step` (by id): the characters of its arguments or code its deltas brought (a key:
    announced)."""
    calls_too_large: EventTooLarge | None = None
    """The calls outgrew what the step's events can hold: the model call was stopped, the run fails."""
    model_call: "asyncio.Task[ModelTurn] | None" = None
    stopped: bool = False
    """Cancel, expiry or a lost lease: the model call must stop (or not start)."""
    model_done: bool = False


class RunService:
    """The orchestrator's logic; one per process, shared by the consumer handlers and background loops."""

    def __init__(self, *, pool: asyncpg.Pool, producer: AIOKafkaProducer, settings: RunOrchestratorSettings,
                 instance_id: str, model: ModelClient, metrics: OrchestratorMetrics,
                 service_metrics: ServiceMetrics | None = None) -> None:
        self._pool = pool
        self._producer = producer
        self._settings = settings
        self.instance_id = instance_id
        self._model = model
        self._metrics = metrics
        self._service_metrics = service_metrics
        self._slots = asyncio.Semaphore(settings.max_concurrent_runs)
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._turns: dict[str, Turn] = {}
        """The turn each driven run is in (its model call is what a cancel stops)."""
        self._loops: list[asyncio.Task[None]] = []

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the lease renewer and the sweeper."""
        self._loops = [asyncio.create_task(self._renew_loop(), name="lease-renewer"),
                       asyncio.create_task(self._sweep_loop(), name="run-sweeper")]

    async def stop(self) -> None:
        """Finish runs in hand for a while, then hand the rest back to the group (call after consumers stop)."""
        if self._drivers:
            await asyncio.wait(list(self._drivers.values()), timeout=self._settings.shutdown_drain_seconds)
        leftover = list(self._drivers)
        for task in list(self._drivers.values()):
            task.cancel()
        for task in list(self._drivers.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        if leftover:
            async with self._pool.acquire() as conn, conn.transaction():
                runs = await repo.requeue_owned(conn, leftover, self.instance_id)
                await self._announce_requeued(conn, runs)
            _log.info("handed %d runs back to the group", len(runs))
        await self._model.close()

    def driving(self) -> list[str]:
        """Runs this instance is driving now."""
        return list(self._drivers)

    # --- commands -------------------------------------------------------------------------------

    async def on_run_requested(self, run_id: str) -> None:
        """RunRequested / ToolOutputsSubmitted: claim the run if it is queued and drive it."""
        await self._claim_and_spawn(run_id, resume=False)

    async def on_cancel_requested(self, run_id: str) -> None:
        """Stop the model call if we drive the run (its driver finishes the cancellation); otherwise finish it here."""
        if self._interrupt(run_id):
            return
        async with self._pool.acquire() as conn, conn.transaction():
            run = await repo.lock_run(conn, run_id)
            if run is None or run.status != "cancelling":
                return
            if run.lease_owner not in (None, self.instance_id) and not run.lease_expired:
                return  # its driver sees `cancelling` when it renews its lease or writes
            await self._terminate(conn, run, "cancelled")

    async def on_tool_call_completed(self, envelope: EventEnvelope) -> None:
        """Record a server-side tool result; when the step has all its results, continue the run."""
        done = ToolCallCompleted.parse(envelope)
        async with self._pool.acquire() as conn, conn.transaction():
            if await claim_event(conn, CONSUMER_NAME, envelope.event_id):
                await self._record_tool_result(conn, done)
        await self._claim_and_spawn(done.run_id, resume=True)

    async def _record_tool_result(self, conn: Conn, done: ToolCallCompleted) -> None:
        run = await repo.lock_run(conn, done.run_id)
        if run is None or run.status not in ("in_progress", "queued"):  # queued: re-queued while the call ran
            return
        step = await repo.lock_step(conn, done.step_id)
        if step is None or step.status != "in_progress" or step.tool_state is None:
            return
        step_call = next((c for c in step.doc["step_details"]["tool_calls"] if c["id"] == done.tool_call_id), None)
        state_call = next((c for c in step.tool_state.get("calls", []) if c["id"] == done.tool_call_id), None)
        if step_call is None or state_call is None or state_call.get("done"):
            return
        sent, results = streamed(step.doc, step.tool_state)
        apply_server_result(step_call, state_call, done)
        # its result, if the calls before it have theirs, and what it held back (the step streams call by call)
        deltas = call_deltas(step.doc, sent, results, done_calls(step.tool_state))
        keep_streamed(step.tool_state, sent, results)
        await repo.update_step(conn, step.doc, step.tool_state)
        await append_events(conn, EVENTS, self._fitting(self._step_deltas(run, deltas)))

    # --- claiming -------------------------------------------------------------------------------

    async def _claim_and_spawn(self, run_id: str, *, resume: bool) -> None:
        # No shortcut on `run_id in self._drivers`: a driver that just wrote requires_action may still be
        # winding down when the outputs arrive. The conditional claim alone decides, once that driver is done: two
        # drivers of one run in this process would hold its lease as one owner (one that lost its lease and
        # does not know yet, re-queued by a sweeper, would write the run the other one drives).
        await self._slots.acquire()
        try:
            previous = self._drivers.get(run_id)
            if previous is not None:
                await asyncio.wait({previous})
            turn = await self._open_turn(run_id, resume=resume)
            if turn is not None and turn.started_stores:
                await self._touch_stores(turn)
        except BaseException:
            self._slots.release()
            raise
        if turn is None:
            self._slots.release()
            return
        self._metrics.runs_claimed.inc()
        task = asyncio.create_task(self._drive(turn), name=f"drive-{run_id}")
        self._drivers[run_id] = task
        self._turns[run_id] = turn
        self._metrics.runs_in_flight.set(len(self._drivers))
        task.add_done_callback(functools.partial(self._driver_done, run_id))

    def _driver_done(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self._drivers.get(run_id) is task:
            del self._drivers[run_id]
            self._turns.pop(run_id, None)
        self._slots.release()
        self._metrics.runs_in_flight.set(len(self._drivers))
        if not task.cancelled() and task.exception() is not None:
            _log.error("driver of %s crashed; its lease will expire and the run be re-queued", run_id,
                       exc_info=task.exception())

    async def _touch_stores(self, turn: Turn) -> None:
        """A run that starts makes its vector stores active, as hosted ("last active: the last time the vector
        store was part of a run"), whether it searches them or not: a thread used daily keeps its store. Best
        effort after the claim (a store is touched again by the next run or search)."""
        try:
            async with self._pool.acquire() as conn:
                await repo.touch_vector_stores(conn, turn.started_stores, now_seconds())
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            _log.warning("run %s: its vector stores were not marked active", turn.run.id, exc_info=True)

    async def _open_turn(self, run_id: str, *, resume: bool) -> Turn | None:
        """Claim the run (queued, or in progress with every tool result in when `resume`) for a model turn.

        A fresh run (queued, no steps) is claimed from an unlocked read by one statement that applies only if
        nobody wrote the run since (two round trips); anything else, or a run written meanwhile, under its lock."""
        now = now_seconds()
        if not resume:
            async with self._pool.acquire() as conn:
                state = await repo.read_for_turn(conn, run_id, resume=False, lock=False)
                if state is None or state.run.status != "queued":
                    return None  # what the locked read would find too: a queued run is only ever left
                if not state.steps and not self._expired(state.run, now) and not state.expired_stores:
                    events = [self._start(state.run, now)]
                    planned = self._plan(state, events, now)
                    if not isinstance(planned, str):
                        turn, step, message = planned
                        if await repo.claim_run(conn, state.run, lease_seconds=self._settings.lease_seconds,
                                                events=events, step=step, message=message, version=state.version):
                            turn.started_stores = state.live_stores
                            return turn
        async with self._pool.acquire() as conn, conn.transaction():
            state = await repo.read_for_turn(conn, run_id, resume=resume, lock=True)
            if state is None:
                return None
            run, steps = state.run, state.steps
            if not (run.status == "queued" or (resume and run.status == "in_progress" and run.lease_owner is None)):
                return None
            tool_step = next((s for s in reversed(steps) if s.doc["type"] == "tool_calls"
                              and s.status == "in_progress"), None)
            waiting = pending_server_calls(tool_step.tool_state) if tool_step else []
            if resume and waiting:
                return None
            if self._expired(run, now):
                await self._terminate(conn, run, "expired")
                return None
            if state.expired_stores:  # as hosted: a run on a thread whose vector store expired fails
                await self._terminate(conn, run, "failed", last_error={
                    "code": "server_error", "message": expired_stores_message(state.expired_stores)})
                return None
            started = run.status == "queued"
            events = [self._start(run, now)] if started else []
            if tool_step is not None and tool_step.tool_state is None:  # its driver stopped as the model wrote it
                tool_step.status = "cancelled"
                events.append(self._unwritten_calls(run, tool_step.doc, now))
                await repo.update_step(conn, tool_step.doc, None)
                tool_step = None
            if tool_step is not None:
                if waiting:  # re-queued because the tool executor did not answer in time
                    await self._redispatch_or_fail(conn, run, tool_step, waiting, events)
                    return None
                if pending_function_calls(tool_step.doc):  # a step that mixed them with server-side calls
                    await self._require_action(conn, run, tool_step, events, now)
                    return None
                tool_step.status = tool_step.doc["status"] = "completed"
                tool_step.doc["completed_at"] = now
                tool_step.doc["usage"] = add_usage((tool_step.tool_state or {}).get("usage"))
                await repo.update_step(conn, tool_step.doc, tool_step.tool_state)
                events.append(event("thread.run.step.completed", tool_step.doc, project_id=run.project_id))
            planned = self._plan(state, events, now)
            if isinstance(planned, str):
                await self._terminate(conn, run, "incomplete", incomplete_reason=planned, events=events)
                return None
            turn, step, message = planned
            await repo.claim_run(conn, run, lease_seconds=self._settings.lease_seconds, events=events, step=step,
                                 message=message, version=None)
            turn.started_stores = state.live_stores if started else []
            return turn

    @staticmethod
    def _expired(run: RunRow, now: int) -> bool:
        return run.expires_at is not None and run.expires_at <= now

    def _start(self, run: RunRow, now: int) -> EventEnvelope:
        """Queued -> in progress, and its event."""
        run.status = run.doc["status"] = "in_progress"
        # Only the first start opens a full window (the run may have waited behind others). Later ones keep the
        # deadline: answered tool outputs got a fresh one from the gateway, and a run whose driver died keeps its
        # own, so one that fails alike each time it comes back still expires.
        if not run.doc.get("started_at"):
            run.doc["started_at"] = now
            run.expires_at = run.doc["expires_at"] = max(run.expires_at or 0, now + self._settings.run_timeout_seconds)
        return event("thread.run.in_progress", run.doc, project_id=run.project_id)

    def _plan(self, state: repo.TurnState, events: list[EventEnvelope], now: int
              ) -> tuple[Turn, dict[str, Any] | None, dict[str, Any] | None] | str:
        """The turn, ours, with its answer's step and message when they open now (their events added); or why
        the run ends incomplete instead."""
        run, steps = state.run, state.steps
        prior_usage = add_usage(*(s.doc.get("usage") for s in steps if s.status == "completed"))
        files_note = code_files_note(code_input_ids(state.code_resources, state.messages), state.code_files,
                                     self._settings.sandbox_input_max_mb << 20) if state.code_resources else None
        prompt_for = functools.partial(build_prompt, run.doc, state.messages, steps, prior_usage["prompt_tokens"],
                                       files_note=files_note)
        prompt = prompt_for(context_tokens=self._context_tokens(str(run.doc["model"])))
        limit = run.doc.get("max_completion_tokens")
        remaining = None if limit is None else int(limit) - prior_usage["completion_tokens"]
        if not prompt.fits or (remaining is not None and remaining <= 0):
            return "max_prompt_tokens" if not prompt.fits else "max_completion_tokens"
        called = made_tool_call(steps)
        turn = Turn(run=run, request=chat_request(run.doc, prompt, max_completion_tokens=remaining, called=called),
                    prior_usage=prior_usage, prompt_for=prompt_for, prompt_tokens=prompt.estimated_tokens,
                    steps=[s.doc for s in steps], called=called)
        open_step = next((s for s in steps if s.doc["type"] == "message_creation" and s.status == "in_progress"),
                         None)
        turn.generated = generated_files([(s.doc, s.tool_state) for s in steps],
                                         open_step.id if open_step is not None else None)
        # a message opened by an earlier driver had its images announced with its first delta
        turn.images_streamed = not turn.generated.images or open_step is not None
        step = message = None
        if open_step is not None:  # a driver died mid-answer: write into the same message
            turn.step_id, turn.step_doc = open_step.id, open_step.doc
            turn.message_id = open_step.doc["step_details"]["message_creation"]["message_id"]
            turn.message_doc = next((m.doc for m in state.messages if m.id == turn.message_id), None)
        elif not can_call_tools(run.doc):  # the answer can only be text: open the message now
            step, message = self._new_answer(turn, now)
            events += self._answer_opened(run, step, message)
        turn.held = turn.message_id is None and forces_tool_call(run.doc, steps)
        run.lease_owner = self.instance_id
        return turn, step, message

    def _context_tokens(self, model: str) -> int:
        """The context length a prompt for `model` must fit: the shorter of THREADLINE_MODEL_CONTEXT_TOKENS and what
        the model's server told (0: unknown)."""
        known = [n for n in (self._settings.model_context_tokens, self._model.context_tokens(model)) if n > 0]
        return min(known, default=0)

    @staticmethod
    def _new_answer(turn: Turn, now: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The message_creation step and the assistant message of a turn's answer (holding only its images yet)."""
        message = new_message(turn.run.doc, now)
        message["content"] = image_parts(turn.generated.images)
        step = new_message_step(turn.run.doc, message["id"], now)
        turn.message_id, turn.step_id = message["id"], step["id"]
        turn.message_doc, turn.step_doc = message, step
        return step, message

    @staticmethod
    def _answer_opened(run: RunRow, step: dict[str, Any], message: dict[str, Any]) -> list[EventEnvelope]:
        project = run.project_id
        return [*events_for(("thread.run.step.created", "thread.run.step.in_progress"), step, project_id=project),
                *events_for(("thread.message.created", "thread.message.in_progress"), message, project_id=project)]

    async def _create_message(self, conn: Conn, turn: Turn, now: int) -> list[EventEnvelope]:
        step, message = self._new_answer(turn, now)
        await repo.insert_step(conn, turn.run.project_id, step)
        await repo.insert_message(conn, turn.run.project_id, message)
        return self._answer_opened(turn.run, step, message)

    async def _require_action(self, conn: Conn, run: RunRow, tool_step: StepRow,
                              events: list[EventEnvelope], now: int) -> None:
        run.status = run.doc["status"] = "requires_action"
        run.doc["required_action"] = required_action(tool_step.doc)
        run.expires_at = run.doc["expires_at"] = now + self._settings.requires_action_timeout_seconds
        run.lease_owner = None
        events.append(event("thread.run.requires_action", run.doc, project_id=run.project_id))
        await repo.save_run(conn, run, lease_seconds=None, events=events)
        self._finished("requires_action", run.doc)

    async def _redispatch_or_fail(self, conn: Conn, run: RunRow, tool_step: StepRow,
                                  waiting: list[dict[str, Any]], events: list[EventEnvelope]) -> None:
        """Server-side calls that were not answered in time: send them again, or fail the run."""
        exhausted = [c for c in waiting if int(c.get("attempt", 1)) >= self._settings.max_tool_attempts]
        if exhausted:
            call = exhausted[0]
            message = (f"The {call['name']} tool call {call['id']} did not complete after "
                       f"{call.get('attempt', 1)} attempt(s).")
            await self._terminate(conn, run, "failed", last_error={"code": "server_error", "message": message},
                                  events=events)
            return
        for call in waiting:
            call["attempt"] = int(call.get("attempt", 1)) + 1
        await repo.update_step(conn, tool_step.doc, tool_step.tool_state)
        for call in waiting:
            await dispatch_server_tool(conn, project_id=run.project_id, request=tool_request(
                run_id=run.id, thread_id=run.thread_id, step_id=tool_step.id, call=call))
        run.lease_owner = None
        await repo.save_run(conn, run, lease_seconds=self._settings.tool_call_timeout_seconds, events=events)

    # --- driving --------------------------------------------------------------------------------

    async def _drive(self, turn: Turn) -> None:
        started = time.monotonic()
        try:
            result = await self._call_model(turn)
        except ModelError as error:
            await self._stop_pump(turn)
            _log.warning("run %s failed: %s", turn.run.id, error.message)
            await self._finish_failed(turn, {"code": error.code, "message": error.message})
            return
        except _Abandon:
            await self._stop_pump(turn)
            await self._finish_interrupted(turn)
            return
        except asyncio.CancelledError:  # shutdown: the run is handed back to the group
            if turn.pump is not None:
                turn.pump.cancel()
            raise
        except Exception as error:
            await self._stop_pump(turn)
            if database_lost(error):  # nothing to blame the run for: it comes back (a driver loss) after its lease
                _log.warning("database lost during the model turn of %s; it is re-queued when its lease runs out",
                             turn.run.id)
                return
            _log.exception("model turn of %s failed unexpectedly", turn.run.id)
            await self._finish_failed(turn, _server_error())
            return
        finally:
            self._metrics.model_seconds.observe(time.monotonic() - started)
        await self._stop_pump(turn)
        if result is None:
            if turn.calls_too_large is not None:
                await self._fail_too_large(turn, turn.calls_too_large)
            else:
                await self._finish_interrupted(turn)
            return
        try:
            await self._finish_turn(turn, result)
        except _MessageDeleted as gone:
            _log.warning("run %s failed: %s", turn.run.id, gone)
            await self._finish_failed(turn, {"code": "server_error", "message": str(gone)})
        except DATA_ERRORS:  # it would fail alike each time the run came back after its lease: fail it now
            _log.exception("recording the model turn of %s failed", turn.run.id)
            await self._finish_failed(turn, _server_error())

    async def _call_model(self, turn: Turn) -> ModelTurn | None:
        """The model turn, or None when it was stopped (cancel, expiry, lost lease). A held answer (`Turn.held`) without
        a call the run allows is dropped and the model asked once more, told what tool_choice requires; the usage of
        both counts."""
        first = await self._fitted_model_turn(turn)
        if first is None or not turn.held:
            return first
        turn.held = False  # from now on the answer is shown as it comes
        if allowed_calls(first.tool_calls, turn.run.doc, turn.called) or not self._remind_to_call(turn, first):
            return first
        turn.dropped_usage = first.usage
        second = await self._fitted_model_turn(turn)
        if second is None:
            return None
        if not allowed_calls(second.tool_calls, turn.run.doc, turn.called):
            _log.warning("run %s: model %s answered in text although tool_choice %s requires a tool call, even when"
                         " told so; the text is the answer", turn.run.id, turn.run.doc["model"],
                         orjson.dumps(turn.run.doc.get("tool_choice")).decode())
        return replace(second, usage=add_usage(turn.dropped_usage, second.usage))

    def _remind_to_call(self, turn: Turn, first: ModelTurn) -> bool:
        """Make the turn's request the one that asks again for the call its run forces: the same, ending with a system
        message that says what tool_choice requires, and with the tokens the first answer left; False when it left
        none (cut at the turn's limit: that answer stands)."""
        request = turn.request
        limit = request.get("max_completion_tokens")
        left = None if limit is None else int(limit) - (first.usage or {}).get("completion_tokens", 0)
        if first.finish_reason == "length" or (left is not None and left <= 0):
            return False
        self._metrics.count_workaround("tool_call_reminder")
        turn.reminders = [tool_call_reminder(turn.run.doc)]
        turn.request = {**request, "messages": [*request["messages"], *turn.reminders],
                        **({"max_completion_tokens": left} if left is not None else {})}
        turn.calls.clear()  # calls to tools the run does not allow: none of them was written
        turn.calls_dirty = False
        _log.info("run %s: model %s answered without the tool call tool_choice requires; asked again", turn.run.id,
                  turn.run.doc["model"])
        return True

    async def _fitted_model_turn(self, turn: Turn) -> ModelTurn | None:
        """One model turn; a prompt the server refused as longer than the model's context is cut to what it said and
        sent again, as long as cutting shortens it."""
        while True:
            try:
                return await self._model_turn(turn)
            except ModelError as error:
                if error.overflow is None or not self._cut_to_fit(turn, error.overflow):
                    raise

    def _cut_to_fit(self, turn: Turn, overflow: ContextOverflow) -> bool:
        """Learn the model's context from the server's refusal and cut the turn's prompt to it (`auto` truncation);
        False when that drops no message (another truncation strategy, or nothing left to drop)."""
        if turn.prompt_for is None:
            return False
        model = str(turn.run.doc["model"])
        context = overflow.context_tokens
        if overflow.prompt_tokens:  # the server counts its own tokens: its context in our estimate's terms
            context = max(context * turn.prompt_tokens // overflow.prompt_tokens, 1)
        self._model.learn_context(model, context)
        prompt = turn.prompt_for(context_tokens=self._context_tokens(model))
        messages = [*prompt.messages, *turn.reminders]
        if len(messages) >= len(turn.request["messages"]):
            return self._fit_answer_limit(turn, overflow)
        _log.info("run %s: the model's server took no prompt of %d tokens (context %d); sent again with %d of %d"
                  " messages", turn.run.id, overflow.prompt_tokens or 0, overflow.context_tokens,
                  len(messages), len(turn.request["messages"]))
        turn.request, turn.prompt_tokens = {**turn.request, "messages": messages}, prompt.estimated_tokens
        self._metrics.count_workaround("context")
        return True

    def _fit_answer_limit(self, turn: Turn, overflow: ContextOverflow) -> bool:
        """A prompt that fits but leaves less room than the turn's `max_completion_tokens` (vLLM refuses that): the
        limit cut to the room left, so the model answers until the context is full, as hosted models did; False when
        the limit was not what did not fit."""
        limit = turn.request.get("max_completion_tokens")
        room = overflow.context_tokens - (overflow.prompt_tokens or overflow.context_tokens)
        if not isinstance(limit, int) or not 0 < room < limit:
            return False
        _log.info("run %s: the model's context leaves %d tokens for the answer; the limit of %d cut to that",
                  turn.run.id, room, limit)
        turn.request = {**turn.request, "max_completion_tokens": room}
        self._metrics.count_workaround("answer_limit")
        return True

    async def _model_turn(self, turn: Turn) -> ModelTurn | None:
        """One model call for the turn's request, its image files' bytes read first."""
        if turn.stopped:
            return None
        turn.model_done = False  # (again, for a turn asked again): a cancel stops this call, names may come in pieces
        file_ids = image_file_ids(turn.request)
        if file_ids:  # the images' bytes are read now, outside the claim: only the model call needs them
            async with self._pool.acquire() as conn:
                files = await repo.file_contents(conn, turn.run.project_id, file_ids, now_seconds())
            turn.request = with_image_files(turn.request, files)
        call = asyncio.create_task(self._model.stream(turn.request, functools.partial(self._on_text, turn),
                                                      functools.partial(self._on_call, turn)))
        turn.model_call = call
        try:
            await asyncio.wait({call})
        finally:
            turn.model_done = True
            turn.model_call = None
            if not call.done():
                call.cancel()
        if call.cancelled():
            return None
        return call.result()

    async def _on_text(self, turn: Turn, piece: str) -> None:
        """Publish text at once when the last delta is older than `delta_flush_seconds`, else coalesce it
        until then (a short answer costs one delta and no timer); held text is not published (`Turn.held`)."""
        if turn.held:
            return
        if turn.message_id is None:
            await self._open_message(turn)
        turn.text += piece
        turn.unsent.append(piece)
        await self._flush_soon(turn)

    async def _on_call(self, turn: Turn, index: int, call: PartialCall) -> None:
        """A tool call grew: its step and deltas follow as text does (`_flush_calls`)."""
        turn.calls[index] = call
        turn.calls_dirty = True
        await self._flush_soon(turn)

    async def _flush_soon(self, turn: Turn) -> None:
        """Flush at once, or when the coalescing window of the last flush ends."""
        if turn.pump is not None:
            return  # the pending flush takes it along
        wait = turn.next_flush - time.monotonic()
        if wait > 0:
            turn.pump = asyncio.create_task(self._pump_deltas(turn, wait))
            return
        turn.next_flush = time.monotonic() + self._settings.delta_flush_seconds
        await self._flush_logged(turn)

    async def _open_message(self, turn: Turn) -> None:
        """First text of a turn that could also have called tools: create the message and its step."""
        step, message = self._new_answer(turn, now_seconds())
        async with self._pool.acquire() as conn:
            if not await repo.open_answer(conn, turn.run, self.instance_id, step, message,
                                          self._answer_opened(turn.run, step, message)):
                turn.message_id = turn.step_id = turn.message_doc = turn.step_doc = None
                raise _Abandon()

    async def _pump_deltas(self, turn: Turn, wait: float) -> None:
        """Publish the text that streams in within the coalescing window (and during its publishing)."""
        while turn.unsent or turn.calls_dirty:
            await asyncio.sleep(wait)
            turn.pumped = asyncio.ensure_future(self._flush_logged(turn))
            await asyncio.shield(turn.pumped)
            turn.pumped = None
            wait = self._settings.delta_flush_seconds
        turn.next_flush = time.monotonic() + self._settings.delta_flush_seconds
        turn.pump = None

    async def _stop_pump(self, turn: Turn) -> None:
        if turn.pump is not None:
            turn.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await turn.pump
            turn.pump = None
        if turn.pumped is not None:
            await turn.pumped  # (it logs its own failures)
            turn.pumped = None
        await self._flush_logged(turn)

    async def _flush_logged(self, turn: Turn) -> None:
        try:
            await self._flush(turn)
        except Exception:
            _log.warning("could not publish a delta of %s", turn.run.id, exc_info=True)

    async def _flush(self, turn: Turn) -> None:
        await self._flush_text(turn)
        await self._flush_calls(turn)

    async def _flush_text(self, turn: Turn) -> None:
        """Publish the unsent text (content part n after the answer's n `image_file` parts).

        The image parts are in the message from its creation, so however its deltas arrive (a gateway stream
        synthesises the text ones it missed), they add up to the final content. The first delta announces
        them (index and type: the SDK concatenates strings, a file id would double), so the SDK's streaming
        helpers fire `on_image_file_done` for each. A text delta carries the annotations that end in it (a source
        marker waits until it closes), as hosted."""
        if turn.message_id is None or (not turn.unsent and turn.images_streamed):
            return
        images = turn.generated.images
        parts: list[dict[str, Any]] = []
        if not turn.images_streamed:
            parts += [{"index": i, "type": "image_file"} for i in range(len(images))]
            turn.images_streamed = True
        text = "".join(turn.unsent)
        turn.unsent.clear()
        sent = len(turn.text) - len(text)
        annotations: list[dict[str, Any]] = []
        if turn.steps or turn.generated.paths:  # the answer may cite: a marker streams whole, with its annotation
            held = 0 if turn.model_done else open_marker_length(text)
            if held:
                text, turn.unsent[:] = text[:-held], [text[-held:]]
            annotations = delta_annotations(turn.text[:sent + len(text)], sent, turn.steps, turn.generated.paths)
        pieces = [text[i:i + _DELTA_CHARS] for i in range(0, len(text), _DELTA_CHARS)] or [""]
        for piece in pieces:  # one, unless the model sent more text at once than a Kafka message holds
            offset = sent
            if piece:  # the first text delta has `annotations` (as hosted: the SDK's snapshot gets a list)
                ends = [a for a in annotations if sent < a["end_index"] <= sent + len(piece)]
                parts.append({"index": len(images), "type": "text", "text": {
                    "value": piece, **({"annotations": ends} if ends or not sent else {})}})
                sent += len(piece)
            if not parts:
                return
            run = turn.run
            envelope = EventEnvelope(
                type="thread.message.delta", project_id=run.project_id, key=run.thread_id, thread_id=run.thread_id,
                run_id=run.id, data={"id": turn.message_id, "object": "thread.message.delta",
                                     "delta": {"content": parts}}, text_offset=offset if piece else None)
            await self._send_delta(envelope)
            parts = []

    async def _send_delta(self, envelope: EventEnvelope) -> None:
        """Enqueue a delta, not awaited: deltas are ephemeral and the producer keeps their order per thread.
        They leave before the closing transaction commits, so before the relay publishes what follows them."""
        sent = await self._producer.send(MESSAGE_DELTAS, envelope.to_bytes(), key=envelope.key.encode())
        sent.add_done_callback(self._delta_sent)

    def _delta_sent(self, sent: "asyncio.Future[Any]") -> None:
        if sent.cancelled() or sent.exception() is not None:
            _log.warning("a message delta was not published: %r", None if sent.cancelled() else sent.exception())
        elif self._service_metrics is not None:
            self._service_metrics.events_produced.labels(topic=MESSAGE_DELTAS).inc()

    async def _flush_calls(self, turn: Turn) -> None:
        """Write the tool calls as far as the model has written them into their step, with deltas announcing new
        calls and bringing the arguments or code written since (through the outbox, ordered with the step's
        events; the step opens with the first flush)."""
        if not turn.calls_dirty:
            return
        turn.calls_dirty = False
        calls = self.streamable_calls(turn)
        if not calls:
            return
        run = turn.run
        opened = turn.call_step is None
        step = turn.call_step or new_tool_calls_step(run.doc, now_seconds())
        events = self._calls_opened(run, step) if opened else []
        step = with_tool_calls(step, calls)
        size = len(orjson.dumps(step))
        if size > _CONTENT_BUDGET:  # the step stays as last written, small enough to be failed with its run
            turn.calls_too_large = EventTooLarge("thread.run.step.failed", size)
            self._stop(turn)
            return
        sent = dict(turn.calls_sent)
        events += self._step_deltas(run, call_deltas(step, sent, [], ()))  # no result yet: up to a server call
        try:
            async with self._pool.acquire() as conn:
                written = await repo.write_streamed_calls(conn, run, self.instance_id, step, events)
        except BaseException:
            turn.calls_dirty = True  # the next flush tries again
            raise
        if not written:  # cancelled, expired or taken over
            self._stop(turn)
            return
        turn.call_step, turn.calls_sent = step, sent

    @staticmethod
    def streamable_calls(turn: Turn) -> list[dict[str, Any]]:
        """The step's calls as far as written: those the run allows, in the model's order, up to the first one
        whose name may not be whole yet (it is once its arguments, a later call or the turn's end began)."""
        run_doc = turn.run.doc
        server = server_tool_types(run_doc.get("tools") or [])
        calls: list[dict[str, Any]] = []
        indexes = sorted(turn.calls)
        for position, index in enumerate(indexes):
            call = turn.calls[index]
            named = call.arguments or position + 1 < len(indexes) or turn.model_done  # a name may come in pieces
            if not (call.name and named):
                break
            written = ModelToolCall(id=call.id, name=call.name, arguments=call.arguments_text())
            calls.append(written_tool_call(written, server=call.name in server))
        return allowed_calls(calls, run_doc, turn.called)

    @staticmethod
    def _calls_opened(run: RunRow, step: dict[str, Any]) -> list[EventEnvelope]:
        """The created and in_progress events of a tool_calls step as it opens (no calls: deltas announce them)."""
        return events_for(("thread.run.step.created", "thread.run.step.in_progress"), step, project_id=run.project_id)

    @staticmethod
    def _unwritten_calls(run: RunRow, step: dict[str, Any], now: int,
                         usage: dict[str, int] | None = None) -> EventEnvelope:
        """Cancel a tool_calls step whose calls the model did not finish writing (its turn was cut short or its
        driver stopped): none of them is made."""
        step.update(status="cancelled", cancelled_at=now, usage=add_usage(usage))
        return event("thread.run.step.cancelled", step, project_id=run.project_id)

    # --- outcomes -------------------------------------------------------------------------------

    async def _lock_own(self, conn: Conn, turn: Turn) -> RunRow | None:
        """The run if we still drive it; a cancellation that arrived meanwhile is finished here."""
        run = await repo.lock_run(conn, turn.run.id)
        if run is None:
            return None
        if run.status == "in_progress" and run.lease_owner == self.instance_id:
            return run
        if run.status == "cancelling" and run.lease_owner in (None, self.instance_id):
            await self._terminate(conn, run, "cancelled", partial=self._partial(turn))
        return None

    def _partial(self, turn: Turn) -> dict[str, list[dict[str, Any]]]:
        """The content of the turn's unfinished message as far as it streamed, cut to what its event can hold."""
        if not turn.message_id:
            return {}
        text = turn.text
        content = self._answer_content(turn, text)
        while text and (size := len(orjson.dumps(content))) > _CONTENT_BUDGET:
            text = text[:int(len(text) * _CONTENT_BUDGET / size * 0.9)]
            content = self._answer_content(turn, text)
        return {turn.message_id: content}

    async def _finish_turn(self, turn: Turn, result: ModelTurn) -> None:
        """Write the turn's outcome; one too large for the outbox fails the run (retrying would never fix it)."""
        result = replace(result, tool_calls=allowed_calls(result.tool_calls, turn.run.doc, turn.called))
        try:
            if result.tool_calls and result.finish_reason != "length":
                async with self._pool.acquire() as conn, conn.transaction():
                    run = await self._lock_own(conn, turn)
                    if run is not None:
                        await self._finish_with_tool_calls(conn, turn, run, result, [], now_seconds())
                return
            if turn.call_step is not None:  # the model was cut off while writing its calls
                async with self._pool.acquire() as conn, conn.transaction():
                    run = await self._lock_own(conn, turn)
                    if run is None:
                        return
                    alone = turn.message_id is None  # no text came before: the calls took the turn's tokens
                    cancelled = self._unwritten_calls(run, turn.call_step, now_seconds(),
                                                      result.usage if alone else None)
                    await repo.update_step(conn, turn.call_step, None)
                    if alone:  # the run ends with them (an empty message would only say nothing)
                        await self._terminate(conn, run, "incomplete", incomplete_reason="max_completion_tokens",
                                              events=[cancelled])
                        return
                    await append_events(conn, EVENTS, [cancelled])
            await self._finish_answer(turn, result)
        except EventTooLarge as error:
            await self._fail_too_large(turn, error)

    async def _fail_too_large(self, turn: Turn, error: EventTooLarge) -> None:
        """Fail a run whose model wrote more than its events can hold (retrying would never fix it)."""
        _log.warning("run %s failed: its outcome is too large to record (%s)", turn.run.id, error)
        await self._finish_failed(turn, {"code": "server_error", "message": (
            f"The model's reply was too large to record: {error.event_type} would be {error.size} bytes as"
            f" JSON; the maximum is {MAX_EVENT_BYTES} bytes.")})

    async def _finish_answer(self, turn: Turn, result: ModelTurn) -> None:
        """The model answered with text: message, step and run finish together (one transaction)."""
        now = now_seconds()
        incomplete = result.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        run_patch = {"status": status, "completed_at": now, "usage": add_usage(turn.prior_usage, result.usage),
                     "required_action": None, "expires_at": None,
                     "incomplete_details": {"reason": "max_completion_tokens"} if incomplete else None}
        # A provider's content filter cut the answer: the message is incomplete (the contract's `content_filter`
        # reason), the run completes (a run's incomplete reasons are its token limits only).
        if incomplete or result.finish_reason == "content_filter":
            message_patch: dict[str, Any] = {"status": "incomplete", "incomplete_at": now, "incomplete_details": {
                "reason": "max_tokens" if incomplete else "content_filter"}}
        else:
            message_patch = {"status": "completed", "completed_at": now}
        message_patch["content"] = content = self._answer_content(turn, result.text) + refusal_content(result.refusal)
        size = len(orjson.dumps(content))
        if size > _CONTENT_BUDGET:  # the statement below builds its events in SQL, past the outbox's own check
            raise EventTooLarge(f"thread.message.{message_patch['status']}", size)
        step_patch = {"status": "completed", "completed_at": now, "usage": add_usage(result.usage)}
        async with self._pool.acquire() as conn:
            if turn.message_id is None:  # nothing was streamed (empty or held answer): the message is written now
                async with conn.transaction():
                    if await self._lock_own(conn, turn) is None:
                        return
                    opened = await self._create_message(conn, turn, now)
                    await self._flush_logged(turn)  # its image parts, if any
                    done = await self._write_answer(conn, turn, status, run_patch, message_patch, step_patch, opened)
            else:
                done = await self._write_answer(conn, turn, status, run_patch, message_patch, step_patch, [])
            if not done:  # cancelled, expired or taken over meanwhile; or the message or step vanished
                async with conn.transaction():
                    if await self._lock_own(conn, turn) is not None:
                        if turn.message_doc is None or await repo.get_message(conn, turn.message_id or "") is None:
                            raise _MessageDeleted(turn.message_id)
                        raise LookupError(f"step {turn.step_id} of run {turn.run.id} vanished")
                return
        self._finished(status, turn.run.doc)

    async def _write_answer(self, conn: Conn, turn: Turn, status: str, run_patch: dict[str, Any],
                            message_patch: dict[str, Any], step_patch: dict[str, Any],
                            opened: list[EventEnvelope]) -> bool:
        """Finish run, message and step with their events (checked as they will be written) in one statement."""
        if turn.message_doc is None or turn.step_doc is None:
            return False
        project = turn.run.project_id
        message = {**turn.message_doc, **message_patch}
        return await repo.finish_answer(
            conn, run_id=turn.run.id, owner=self.instance_id, status=status, run_patch=run_patch,
            message_id=turn.message_id or "", message_patch=message_patch, step_id=turn.step_id or "",
            step_patch=step_patch, events=[
                *((e, None) for e in opened),
                (event_without_data(f"thread.message.{message['status']}", message, project_id=project), "message"),
                (event_without_data("thread.run.step.completed", {**turn.step_doc, **step_patch}, project_id=project),
                 "step"),
                (event_without_data(f"thread.run.{status}", {**turn.run.doc, **run_patch}, project_id=project),
                 "run")])

    @staticmethod
    def _answer_content(turn: Turn, text: str) -> list[dict[str, Any]]:
        """The message content for the model's text: first an `image_file` part per image the run's code made
        since its previous assistant message (as hosted), then the text with file citations from the run's
        file_search steps and `file_path` annotations on links to files its code generated."""
        content = image_parts(turn.generated.images) + text_content(text)
        annotate_content(content, turn.steps, turn.generated.paths)
        return content

    async def _message_doc(self, conn: Conn, turn: Turn) -> dict[str, Any]:
        message = await repo.get_message(conn, turn.message_id or "")
        if message is None:
            raise _MessageDeleted(turn.message_id)
        return message.doc

    async def _step_doc(self, conn: Conn, turn: Turn) -> dict[str, Any]:
        step = await repo.lock_step(conn, turn.step_id or "")
        if step is None:
            raise RuntimeError(f"step {turn.step_id} of run {turn.run.id} vanished")
        return step.doc

    async def _finish_with_tool_calls(self, conn: Conn, turn: Turn, run: RunRow, result: ModelTurn,
                                      events: list[EventEnvelope], now: int) -> None:
        project = run.project_id
        usage = result.usage
        if turn.message_id is not None:  # text before the tool calls: that message is done
            message = await self._message_doc(conn, turn)
            message.update(content=self._answer_content(turn, result.text), status="completed", completed_at=now)
            await repo.update_message(conn, message)
            step = await self._step_doc(conn, turn)
            step.update(status="completed", completed_at=now, usage=add_usage(usage))
            await repo.update_step(conn, step, None)
            events += [event("thread.message.completed", message, project_id=project),
                       event("thread.run.step.completed", step, project_id=project)]
            usage = None
        split = split_tool_calls(result.tool_calls, run.doc.get("tools") or [])
        calls = [step_tool_call(c, server=False) for c in split.function]
        calls += [step_tool_call(c, server=True) for c in split.server]
        order = {c.id: i for i, c in enumerate(result.tool_calls)}
        calls.sort(key=lambda c: order[c["id"]])
        state = tool_state(split, usage)
        step_doc = with_tool_calls(turn.call_step or new_tool_calls_step(run.doc, now), calls)
        if turn.call_step is None:  # no flush wrote it (none could): it opens now
            events += self._calls_opened(run, with_tool_calls(step_doc, []))
        sent: dict[str, int] = dict(turn.calls_sent)
        results: list[str] = []
        events += self._step_deltas(run, call_deltas(step_doc, sent, results, ()))  # what no flush sent
        keep_streamed(state, sent, results)
        if turn.call_step is not None:  # opened as the model wrote its calls
            await repo.update_step(conn, step_doc, state)
        else:
            await repo.insert_step(conn, project, step_doc, state)
        if split.server:  # the step's events first: the executor's answer cannot overtake them
            run.lease_owner = None
            await repo.save_run(conn, run, lease_seconds=self._settings.tool_call_timeout_seconds, events=events)
            for call in state["calls"]:
                if call["server"]:
                    await dispatch_server_tool(conn, project_id=project, request=tool_request(
                        run_id=run.id, thread_id=run.thread_id, step_id=step_doc["id"], call=call))
            return
        step_row = StepRow(id=step_doc["id"], status="in_progress", doc=step_doc, tool_state=state)
        await self._require_action(conn, run, step_row, events, now)

    @staticmethod
    def _step_deltas(run: RunRow, deltas: list[dict[str, Any]]) -> list[EventEnvelope]:
        """Step deltas (`call_deltas`), through the outbox.

        Unlike text deltas these are ordered with the step's events on one topic: a stream ends at
        requires_action, so a function call's arguments must arrive before it; a server-side call's code is
        published with its step, before the tool executor has the call, and its outputs after its announcement."""
        return [EventEnvelope(type="thread.run.step.delta", project_id=run.project_id, key=run.thread_id,
                              thread_id=run.thread_id, run_id=run.id, data=data) for data in deltas]

    @staticmethod
    def _fitting(deltas: list[EventEnvelope]) -> list[EventEnvelope]:
        """The deltas an event can hold: a result too large for one is left out (the step's completed event brings
        the whole step), and the calls it held back still stream."""
        fitting = []
        for delta in deltas:
            with contextlib.suppress(EventTooLarge):
                ensure_room(delta, 0)
                fitting.append(delta)
        return fitting

    async def _finish_failed(self, turn: Turn, last_error: dict[str, str]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            run = await self._lock_own(conn, turn)
            if run is not None:
                await self._terminate(conn, run, "failed", last_error=last_error, partial=self._partial(turn),
                                      dropped_usage=turn.dropped_usage)

    async def _finish_interrupted(self, turn: Turn) -> None:
        """The model call was stopped: finish a cancellation; anything else is someone else's to write."""
        async with self._pool.acquire() as conn, conn.transaction():
            if await self._lock_own(conn, turn) is not None:  # stopped, yet still ours: let it run again
                await self._announce_requeued(conn, await repo.requeue_owned(conn, [turn.run.id], self.instance_id))

    async def _terminate(self, conn: Conn, run: RunRow, status: str, *,
                         last_error: dict[str, str] | None = None, incomplete_reason: str | None = None,
                         partial: dict[str, list[dict[str, Any]]] | None = None,
                         events: list[EventEnvelope] | None = None,
                         dropped_usage: dict[str, int] | None = None) -> None:
        """Put the run in a terminal state, closing its open steps and messages, with their events; its usage is its
        steps' and `dropped_usage` (model answers spent without a step to show them)."""
        now = now_seconds()
        events = list(events or [])
        project = run.project_id
        steps = await repo.load_steps(conn, run.id)
        step_status = {"cancelled": "cancelled", "failed": "failed", "expired": "expired"}.get(status, "completed")
        for step in steps:
            if step.status != "in_progress":
                continue
            step.status = step.doc["status"] = step_status
            # a tool_calls step keeps its turn's usage in tool_state until it completes: it was spent all the same
            step.doc["usage"] = add_usage(step.doc.get("usage") or (step.tool_state or {}).get("usage"))
            step.doc[{"cancelled": "cancelled_at", "failed": "failed_at", "expired": "expired_at"}.get(
                step_status, "completed_at")] = now
            if step_status == "failed":
                step.doc["last_error"] = _step_error(last_error)
            if step.doc["type"] == "tool_calls" and step.tool_state is not None:  # the calls it held back
                sent, results = streamed(step.doc, step.tool_state)
                events += self._fitting(self._step_deltas(run, call_deltas(
                    step.doc, sent, results, done_calls(step.tool_state), ending=True)))
                keep_streamed(step.tool_state, sent, results)
            await repo.update_step(conn, step.doc, step.tool_state)
            events.append(event(f"thread.run.step.{step_status}", step.doc, project_id=project))
        reason = {"cancelled": "run_cancelled", "failed": "run_failed", "expired": "run_expired"}.get(
            status, "max_tokens")
        for message in await repo.in_progress_messages(conn, run.id):
            doc = message.doc
            if partial and message.id in partial:
                doc["content"] = partial[message.id]
            doc.update(status="incomplete", incomplete_at=now, incomplete_details={"reason": reason})
            await repo.update_message(conn, doc)
            events.append(event("thread.message.incomplete", doc, project_id=project))
        run.status = run.doc["status"] = status
        stamp = {"cancelled": "cancelled_at", "failed": "failed_at", "expired": None}.get(status, "completed_at")
        if stamp:
            run.doc[stamp] = now
        run.doc.update(required_action=None, expires_at=None,
                       usage=add_usage(*(s.doc.get("usage") for s in steps), dropped_usage))
        if last_error:
            run.doc["last_error"] = last_error
        if incomplete_reason:
            run.doc["incomplete_details"] = {"reason": incomplete_reason}
        run.expires_at = None
        events.append(event(f"thread.run.{status}", run.doc, project_id=project))
        await repo.save_run(conn, run, lease_seconds=None, events=events)
        self._finished(status, run.doc)

    def _finished(self, status: str, run_doc: dict[str, Any]) -> None:
        """Count a run reaching `status` (terminal or requires_action) and how long it took since creation."""
        self._metrics.runs_finished.labels(status=status).inc()
        self._metrics.run_duration.labels(status=status).observe(max(0.0, time.time() - run_doc["created_at"]))

    # --- background loops -----------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        """Keep our leases alive; stop model calls of runs that were cancelled, expired or taken from us."""
        interval = max(self._settings.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._drivers)
            if not ids:
                continue
            try:
                async with self._pool.acquire() as conn:
                    lost = await repo.renew_leases(conn, ids, self.instance_id, self._settings.lease_seconds)
            except Exception:
                _log.exception("lease renewal failed")
                continue
            for run_id in lost:
                self._interrupt(run_id)

    def _interrupt(self, run_id: str) -> bool:
        """Stop the model call of the run's turn here; True if the turn had not finished its model call."""
        turn = self._turns.get(run_id)
        return turn is not None and self._stop(turn)

    @staticmethod
    def _stop(turn: Turn) -> bool:
        """Stop the turn's model call; True if it had not finished."""
        if turn.model_done:
            return False
        turn.stopped = True
        if turn.model_call is not None:
            turn.model_call.cancel()
        return True

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_interval_seconds)
            try:
                await self.sweep()
            except Exception:
                _log.exception("sweep failed")

    async def sweep(self) -> None:
        """Re-queue runs whose driver died, send again the commands of queued runs nobody claimed, expire overdue runs,
        finish orphaned cancellations."""
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                requeued = await repo.requeue_dead_leases(conn, _SWEEP_BATCH, self._settings.max_driver_losses)
                await self._announce_requeued(conn, requeued)
            if requeued:
                _log.warning("re-queued %d runs whose lease expired", len(requeued))
            async with conn.transaction():
                unclaimed = await repo.reannounce_unclaimed(conn, _SWEEP_BATCH, self._settings.unclaimed_run_seconds)
                await self._send_commands(conn, unclaimed)
            if unclaimed:
                _log.warning("sent the commands of %d queued runs nobody claimed again", len(unclaimed))
            async with conn.transaction():
                for run in await repo.lock_lost_for_good(conn, _SWEEP_BATCH, self._settings.max_driver_losses):
                    _log.error("run %s lost its driver %d times; failing it", run.id, self._settings.max_driver_losses)
                    await self._sweep_one(conn, run, "failed", last_error={
                        "code": "server_error", "message": "The server had an error while processing the run: it "
                        f"was interrupted {self._settings.max_driver_losses} times."})
            expired: list[str] = []
            async with conn.transaction():
                for run in await repo.lock_overdue_runs(conn, now_seconds(), _SWEEP_BATCH):
                    if await self._sweep_one(conn, run, "expired"):
                        expired.append(run.id)
            for run_id in expired:
                self._interrupt(run_id)
            async with conn.transaction():
                for run in await repo.lock_orphaned_cancellations(conn, _SWEEP_BATCH):
                    if run.id not in self._drivers:
                        await self._sweep_one(conn, run, "cancelled")

    async def _sweep_one(self, conn: Conn, run: RunRow, status: str, last_error: dict[str, str] | None = None) -> bool:
        """Terminate one swept run in a savepoint of its own (False: failed), so one bad run (a broken stored doc)
        cannot roll back the batch and keep every other run from ever being swept."""
        try:
            async with conn.transaction():
                await self._terminate(conn, run, status, last_error=last_error)
        except Exception:
            _log.exception("sweep could not make run %s %s; it is tried again next pass", run.id, status)
            self._metrics.sweep_failures.inc()
            return False
        return True

    async def _announce_requeued(self, conn: Conn, runs: list[RunRow]) -> None:
        if not runs:
            return
        await append_events(conn, EVENTS, [event("thread.run.queued", r.doc, project_id=r.project_id) for r in runs])
        await self._send_commands(conn, runs)

    @staticmethod
    async def _send_commands(conn: Conn, runs: list[RunRow]) -> None:
        """RunRequested for each run, in the caller's transaction."""
        if not runs:
            return
        await append_events(conn, RUN_COMMANDS, [
            RunRequested(run_id=r.id, thread_id=r.thread_id).envelope(
                project_id=r.project_id, key=r.thread_id, thread_id=r.thread_id, run_id=r.id) for r in runs])
