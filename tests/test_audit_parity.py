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


def test_runs_on_a_model_that_refuses_sampling_parameters_complete(client: openai.OpenAI, model: ScriptedModelServer,
                                                                   marker: str) -> None:
    """Hosted runs on reasoning models (o1, o3-mini) worked, though their assistants carry `temperature` and `top_p`
    1.0; OpenAI's chat completions answers 400 `unsupported_parameter` ("Unsupported parameter: 'temperature' is not
    supported with this model.") to either, even at 1, and every such run failed with invalid_prompt here. A refused
    parameter holding the default is left out (and no longer sent to that model); one the user set is still an
    error."""
    refuses = f"[[unsupported:temperature]] [[unsupported:top_p]] {marker}"
    assistant = client.beta.assistants.create(model=f"o3-mini-{marker}")
    assert (assistant.temperature, assistant.top_p) == (1.0, 1.0)
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"[[reply:thought]] {refuses}"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    [answer] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    assert answer.content[0].type == "text" and answer.content[0].text.value == "thought"
    sent = model.find_requests(marker)
    assert "temperature" not in sent[-1] and "top_p" not in sent[-1]
    assert [("temperature" in r, "top_p" in r) for r in sent] == [(True, True), (False, True), (False, False)]

    client.beta.threads.messages.create(thread_id=thread.id, role="user", content=f"[[reply:again]] {refuses} next")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    later = model.find_requests(f"{marker} next")
    assert len(later) == 1 and "temperature" not in later[0]  # the model's refusals are remembered

    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"[[reply:x]] {refuses} set"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, temperature=0.2,
                                                   poll_interval_ms=50)
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "invalid_prompt"
    assert "Unsupported parameter: 'temperature'" in run.last_error.message


def test_deleting_a_file_removes_it_from_code_interpreter_resources(client: openai.OpenAI) -> None:
    """The file search docs: deleting the underlying file object "removes the file from all vector_store and
    code_interpreter configurations across all assistants and threads". The vector stores lost it here; the
    assistants' and threads' `tool_resources.code_interpreter.file_ids` kept naming the deleted file."""
    doomed = client.files.create(file=("doomed.csv", b"a,b\n1,2\n"), purpose="assistants").id
    kept = client.files.create(file=("kept.csv", b"a,b\n3,4\n"), purpose="assistants").id
    resources = {"code_interpreter": {"file_ids": [doomed, kept]}}
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}],
                                              tool_resources=resources)
    thread = client.beta.threads.create(tool_resources=resources)
    alone = client.beta.threads.create(tool_resources={"code_interpreter": {"file_ids": [doomed]}})
    other = client.beta.assistants.create(model="gpt-4o", tool_resources={"code_interpreter": {"file_ids": [kept]}})

    assert client.files.delete(doomed).deleted

    def file_ids(resources: object) -> list[str] | None:
        code_interpreter = getattr(resources, "code_interpreter", None)
        return None if code_interpreter is None else code_interpreter.file_ids

    assert file_ids(client.beta.assistants.retrieve(assistant.id).tool_resources) == [kept]
    assert file_ids(client.beta.threads.retrieve(thread.id).tool_resources) == [kept]
    assert file_ids(client.beta.threads.retrieve(alone.id).tool_resources) == []
    assert file_ids(client.beta.assistants.retrieve(other.id).tool_resources) == [kept]
    # What is left can be sent back as it is (a deleted id in it was a 404 on every update).
    client.beta.assistants.update(assistant.id, tool_resources={"code_interpreter": {"file_ids": [kept]}})
