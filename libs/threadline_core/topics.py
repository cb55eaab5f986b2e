"""Kafka topic names: the only channels between services."""

RUN_COMMANDS = "threadline.run.commands"
"""Commands for the run orchestrator (run requested, cancel requested, tool outputs submitted, tool results)."""

EVENTS = "threadline.events"
"""Public state-change events (thread.run.*, thread.run.step.*, thread.message.*, vector_store.file.*)."""

MESSAGE_DELTAS = "threadline.message.deltas"
"""Ephemeral streaming deltas (thread.message.delta, thread.run.step.delta); not part of the outbox."""

TOOL_REQUESTS = "threadline.tool.requests"
"""Server-side tool calls (code_interpreter, file_search) for the tool executor."""

INGESTION_REQUESTS = "threadline.ingestion.requests"
"""Files to parse, chunk, embed and index, for the ingestion service."""

SEARCH_REQUESTS = "threadline.search.requests"
"""Reads of the vector index (search, a file's chunks, point counts) for the ingestion service, which holds Qdrant."""

SEARCH_REPLIES = "threadline.search.replies"
"""Answers to SEARCH_REQUESTS and MODEL_REQUESTS, keyed by the asking instance (`reply_to`); every gateway reads all
of them."""

MODEL_REQUESTS = "threadline.model.requests"
"""Reads of the model endpoint (the models it serves) for the run orchestrator, which talks to it; answered on
SEARCH_REPLIES like every request/reply."""

WEBHOOK_COMMANDS = "threadline.webhook.commands"
"""Commands for the notifier: deliveries made due by the gateway (resend, recover, re-enable) to lease at once."""

ALL_TOPICS = (RUN_COMMANDS, EVENTS, MESSAGE_DELTAS, TOOL_REQUESTS, INGESTION_REQUESTS, SEARCH_REQUESTS, SEARCH_REPLIES,
              WEBHOOK_COMMANDS, MODEL_REQUESTS)
