"""Requests that clients other than the newest SDK send (older openai releases, frameworks driving the Assistants
API through the SDK), answered as the hosted API answered them; each sent here through the SDK or raw HTTP."""

from collections.abc import Callable
from typing import Any

import openai
import pytest
from error_helpers import sdk_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """An assistant with file_search and code_interpreter."""
    return client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"},
                                                                {"type": "code_interpreter"}]).id


def test_an_attachment_without_tools_is_refused(client: openai.OpenAI, assistant_id: str) -> None:
    """llama-index-agent-openai 0.2.x attached files as `{"file_id": ...}` and openai 1.21.x as
    `{"file_id", "add_to": [...]}`: hosted answered 400 "Missing required parameter: 'attachments[0].tools'."
    (openai/openai-python#1335); we stored the message with a file attached to no tool, so file_search answered
    that no file was attached and code_interpreter never saw it."""
    file_id = client.files.create(file=("notes.txt", b"The code word is PINEAPPLE."), purpose="assistants").id
    thread = client.beta.threads.create()
    bare: list[Any] = [{"file_id": file_id}]
    sends: list[tuple[Callable[[list[Any]], object], str]] = [
        (lambda attachments: client.beta.threads.messages.create(
            thread_id=thread.id, role="user", content="x", attachments=attachments), "attachments[0].tools"),
        (lambda attachments: client.beta.threads.create(messages=[
            {"role": "user", "content": "x", "attachments": attachments}]), "messages[0].attachments[0].tools"),
        (lambda attachments: client.beta.threads.runs.create(
            thread_id=thread.id, assistant_id=assistant_id,
            additional_messages=[{"role": "user", "content": "x", "attachments": attachments}]),
         "additional_messages[0].attachments[0].tools"),
        (lambda attachments: client.beta.threads.create_and_run(assistant_id=assistant_id, thread={"messages": [
            {"role": "user", "content": "x", "attachments": attachments}]}),
         "thread.messages[0].attachments[0].tools"),
    ]
    for send, param in sends:
        for attachments in (bare, [{"file_id": file_id, "add_to": ["file_search"]}]):
            with pytest.raises(openai.BadRequestError) as refused:
                send(attachments)
            assert sdk_error(refused.value) == {"message": f"Missing required parameter: '{param}'.",
                                                "type": "invalid_request_error", "param": param,
                                                "code": "missing_required_parameter"}
    assert client.beta.threads.messages.list(thread_id=thread.id).data == []
    assert client.beta.threads.runs.list(thread_id=thread.id).data == []
    message = client.beta.threads.messages.create(thread_id=thread.id, role="user", content="x", attachments=[
        {"file_id": file_id, "tools": [{"type": "file_search"}]}])
    assert message.attachments is not None
    assert [(a.file_id, [t.type for t in a.tools or []]) for a in message.attachments] == [(file_id, ["file_search"])]
