"""Differences from the hosted API found by a fourth new-user trial (the Assistants docs' flows run unchanged),
each checked through the official SDK against the real stack."""

import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta.threads import Message, MessageDelta
from run_helpers import wait_for
from typing_extensions import override

from threadline_devstack.model_server import ScriptedModelServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REFUSAL = "I'm sorry, I cannot help with that request."


class DeltaRecorder(AssistantEventHandler):
    """The message deltas the SDK's streaming helpers report."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas: list[MessageDelta] = []

    @override
    def on_message_delta(self, delta: MessageDelta, snapshot: Message) -> None:
        self.deltas.append(delta)


def test_a_model_refusal_is_a_refusal_content_part(client: openai.OpenAI, model: ScriptedModelServer,
                                                   marker: str) -> None:
    """A model refusing (Structured Outputs' `refusal`, streamed in `delta.refusal` with no content) became a
    `{"type": "refusal", "refusal": ...}` part of the message, streamed as refusal deltas, as hosted (the contract's
    MessageContentRefusalObject / MessageDeltaContentRefusalObject, the SDK's RefusalContentBlock): we dropped it,
    and the run completed with an empty message."""
    assistant = client.beta.assistants.create(model="gpt-4o", response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
            "additionalProperties": False}}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"[[refusal:{REFUSAL}]] {marker}"}])
    recorder = DeltaRecorder()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=recorder) as stream:
        stream.until_done()
        assert stream.get_final_run().status == "completed"
        [streamed] = stream.get_final_messages()
        snapshot = stream.current_message_snapshot
    assert [part.model_dump() for part in streamed.content] == [{"type": "refusal", "refusal": REFUSAL}]
    assert snapshot is not None and [p.model_dump() for p in snapshot.content] == [
        {"type": "refusal", "refusal": REFUSAL}]  # the deltas add up to it
    assert [part.type for delta in recorder.deltas for part in delta.content or []] == ["refusal"]
    [stored] = client.beta.threads.messages.list(thread_id=thread.id, run_id=streamed.run_id).data
    assert stored.content == streamed.content and stored.status == "completed"

    # Polled, the same; and the thread's next run shows the model what it said.
    client.beta.threads.messages.create(thread_id=thread.id, role="user", content=f"[[reply:ok]] next {marker}")
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    assert wait_for(client, thread.id, run.id).status == "completed"
    [request] = [r for r in model.find_requests(f"next {marker}")]
    assert {"role": "assistant", "content": REFUSAL} in request["messages"]


def test_an_answer_cut_by_a_content_filter_is_an_incomplete_message(client: openai.OpenAI, marker: str) -> None:
    """A model whose provider's filter stopped its answer (`finish_reason: "content_filter"`) left the message
    `incomplete` with `incomplete_details.reason` "content_filter" on the hosted API (the reason the contract gives
    messages for it); we showed the cut answer as a completed message. The run completes: its own incomplete reasons
    are token limits only."""
    assistant = client.beta.assistants.create(model="gpt-4o")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"[[reply:The first part of an answer]] [[finish:content_filter]] {marker}")}])
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        events = [event.event for event in stream]
        run = stream.get_final_run()
        [streamed] = stream.get_final_messages()
    assert run.status == "completed" and run.incomplete_details is None
    assert "thread.message.incomplete" in events and "thread.message.completed" not in events
    [stored] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    for message in (streamed, stored):
        assert message.status == "incomplete" and message.incomplete_details is not None
        assert message.incomplete_details.reason == "content_filter"
        assert message.incomplete_at is not None and message.completed_at is None
        assert message.content[0].type == "text" and message.content[0].text.value == "The first part of an answer"
