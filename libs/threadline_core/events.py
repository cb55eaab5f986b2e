"""Event envelope and typed payloads exchanged over Kafka. Changes here are additive only."""

from datetime import UTC, datetime
from typing import Any, ClassVar, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field

from threadline_core.ids import new_id


def _utcnow() -> datetime:
    return datetime.now(UTC)


class EventEnvelope(BaseModel):
    """What travels on every topic: identity, type, time, routing keys and the payload."""

    model_config = ConfigDict(extra="ignore")

    event_id: str = Field(default_factory=lambda: new_id("evt"))
    type: str
    occurred_at: datetime = Field(default_factory=_utcnow)
    project_id: str
    key: str
    thread_id: str | None = None
    run_id: str | None = None
    sequence: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    text_offset: int | None = None
    """A message delta's text part: how many characters of that part came before it. A run driven again after
    its driver stopped streams its answer from the start into the same message; streams drop what they sent."""

    def to_bytes(self) -> bytes:
        """Serialise for Kafka (pydantic-core writes the JSON directly: a third of the dict-then-orjson cost)."""
        return self.__pydantic_serializer__.to_json(self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Parse a Kafka message value."""
        return cls.model_validate(orjson.loads(raw))


class Payload(BaseModel):
    """A typed command payload; `TYPE` is the envelope type it travels under."""

    model_config = ConfigDict(extra="ignore")
    TYPE: ClassVar[str]

    def envelope(self, *, project_id: str, key: str, thread_id: str | None = None,
                 run_id: str | None = None) -> EventEnvelope:
        """Wrap this payload in an envelope."""
        return EventEnvelope(type=self.TYPE, project_id=project_id, key=key, thread_id=thread_id,
                             run_id=run_id, data=self.model_dump(mode="json"))

    @classmethod
    def parse(cls, envelope: EventEnvelope) -> Self:
        """Read this payload back from an envelope."""
        return cls.model_validate(envelope.data)


# --- run orchestrator commands (topic RUN_COMMANDS, key thread_id) ---------------------------------


class RunRequested(Payload):
    """A run was created (status queued) and should be driven."""

    TYPE: ClassVar[str] = "command.run.requested"
    run_id: str
    thread_id: str


class RunCancelRequested(Payload):
    """The user asked to cancel; the run is `cancelling`."""

    TYPE: ClassVar[str] = "command.run.cancel_requested"
    run_id: str
    thread_id: str


class ToolOutputsSubmitted(Payload):
    """Function outputs were stored on the run; drive it onward."""

    TYPE: ClassVar[str] = "command.run.tool_outputs_submitted"
    run_id: str
    thread_id: str


class ToolCallCompleted(Payload):
    """A server-side tool call finished on the tool executor (outputs or an error)."""

    TYPE: ClassVar[str] = "command.run.tool_call_completed"
    run_id: str
    thread_id: str
    step_id: str
    tool_call_id: str
    tool_type: str
    result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


# --- tool executor requests (topic TOOL_REQUESTS, key thread_id) -----------------------------------


class ToolCallRequested(Payload):
    """Run one server-side tool call (code_interpreter or file_search)."""

    TYPE: ClassVar[str] = "command.tool.call_requested"
    run_id: str
    thread_id: str
    step_id: str
    tool_call_id: str
    tool_type: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 1


# --- ingestion requests (topic INGESTION_REQUESTS, key vector_store_id) -----------------------------


class FileIngestionRequested(Payload):
    """Parse, chunk, embed and index one file of one vector store."""

    TYPE: ClassVar[str] = "command.ingestion.file_requested"
    vector_store_id: str
    file_id: str
    batch_id: str | None = None
    chunking_strategy: dict[str, Any] = Field(default_factory=dict)
    request_id: str | None = None
    """The request this command announces again (the ingestion sweep's, for one nobody started: lost with a broker
    that lost acknowledged records); None: this envelope's own event id, the request id the attach recorded."""

    def request(self, envelope: EventEnvelope) -> str:
        """The id of the request this command carries (what the vector store file's `request_id` must match)."""
        return self.request_id or envelope.event_id


class FileDetached(Payload):
    """A file left a vector store (detached, cancelled or deleted): remove its points."""

    TYPE: ClassVar[str] = "command.ingestion.file_detached"
    vector_store_id: str
    file_id: str


class VectorStoreDeleted(Payload):
    """A vector store was deleted: remove all its points."""

    TYPE: ClassVar[str] = "command.ingestion.vector_store_deleted"
    vector_store_id: str


# --- notifier commands (topic WEBHOOK_COMMANDS, key endpoint_id) -----------------------------------------------


class WebhookDeliveriesDue(Payload):
    """An endpoint's deliveries became due now (resend, recover, re-enable), so a notifier leases them at once."""

    TYPE: ClassVar[str] = "command.webhook.deliveries_due"
    endpoint_id: str


# --- requests and replies (SEARCH_REQUESTS, MODEL_REQUESTS key request_id; SEARCH_REPLIES key reply_to) ------


class ServiceRequest(Payload):
    """A read some instance waits for: its reply goes to `reply_to`; after `deadline` nobody waits any more."""

    OPERATION: ClassVar[str]
    """Short name for logs and metrics labels."""
    request_id: str = Field(default_factory=lambda: new_id("req"))
    reply_to: str = ""
    deadline: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        """True once the asker has given up (answering would be wasted work)."""
        if self.deadline is None:
            return False
        deadline = self.deadline if self.deadline.tzinfo else self.deadline.replace(tzinfo=UTC)
        return (now or _utcnow()) >= deadline


class VectorSearchRequested(ServiceRequest):
    """The best chunks of vector stores for one or more queries (`POST /v1/vector_stores/{id}/search`)."""

    TYPE: ClassVar[str] = "command.search.query_requested"
    OPERATION: ClassVar[str] = "search"
    vector_store_ids: list[str]
    query: list[str]
    max_num_results: int = 10
    score_threshold: float | None = None
    """None: the contract's default, 0."""
    file_ids: list[str] | None = None
    """The files of each store to search (the completed ones whose attributes match the filters); None: every
    file."""


class FileChunksRequested(ServiceRequest):
    """The indexed chunks of one file in order (`GET /v1/vector_stores/{id}/files/{file_id}/content`)."""

    TYPE: ClassVar[str] = "command.search.chunks_requested"
    OPERATION: ClassVar[str] = "chunks"
    vector_store_id: str
    file_id: str


class PointCountRequested(ServiceRequest):
    """How many points the index holds for a store and/or a file (operators, tests, benchmarks)."""

    TYPE: ClassVar[str] = "command.search.count_requested"
    OPERATION: ClassVar[str] = "count"
    vector_store_id: str | None = None
    file_id: str | None = None


class ModelsRequested(ServiceRequest):
    """The models the model endpoint serves (`GET /v1/models`, `/v1/models/{model}`), asked of the run orchestrator.

    `model`: only that one (an empty list when it is not served); None: all of them. Each item is an
    `openai.types.Model` (id, object, created, owned_by)."""

    TYPE: ClassVar[str] = "command.model.list_requested"
    OPERATION: ClassVar[str] = "models"
    model: str | None = None


class ReplyError(BaseModel):
    """Why a request failed, as the HTTP status and OpenAI error fields the asker should answer with."""

    model_config = ConfigDict(extra="ignore")
    status: int
    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None


class ServiceReplied(Payload):
    """One part of the answer to a ServiceRequest (a search's on SEARCH_REQUESTS, a model list's on MODEL_REQUESTS;
    both come back on SEARCH_REPLIES): `items` are split over `parts` records to keep each small.

    Every part carries the same `reply_id` (one answer; a request handled twice answers twice) and the whole
    `result` and `error`; the asker joins the `items` of parts 0..parts-1 of the first answer it sees."""

    TYPE: ClassVar[str] = "reply.search"
    request_id: str
    reply_id: str = Field(default_factory=lambda: new_id("rep"))
    part: int = 0
    parts: int = 1
    items: list[dict[str, Any]] = Field(default_factory=list)
    result: dict[str, Any] = Field(default_factory=dict)
    error: ReplyError | None = None


_STATUS_EVENTS = {
    "thread.run": ("created", "queued", "in_progress", "requires_action", "cancelling", "cancelled", "failed",
                   "completed", "incomplete", "expired"),
    "thread.run.step": ("created", "in_progress", "delta", "completed", "failed", "cancelled", "expired"),
    "thread.message": ("created", "in_progress", "delta", "completed", "incomplete"),
    "vector_store.file": ("in_progress", "completed", "cancelled", "failed"),
    "vector_store.file_batch": ("in_progress", "completed", "cancelled", "failed"),
}
PUBLIC_EVENT_TYPES: frozenset[str] = frozenset(
    {"thread.created"} | {f"{kind}.{status}" for kind, statuses in _STATUS_EVENTS.items() for status in statuses})
"""Every type `public_event` is given: what the project stream's `types=` filter can name."""


def public_event(*, type: str, project_id: str, key: str, data: dict[str, Any],
                 thread_id: str | None = None, run_id: str | None = None) -> EventEnvelope:
    """A public state-change event (topic EVENTS): `type` is the API's event name, `data` the object."""
    return EventEnvelope(type=type, project_id=project_id, key=key, thread_id=thread_id, run_id=run_id,
                         data=data)
