"""What a new user does first, through the official SDK against the real stack: the README's snippets as
written, and file_search over a file attached to a message (the hosted documentation's pattern)."""

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from run_helpers import assistant_reply

from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

README = Path(__file__).resolve().parent.parent / "README.md"
INCLUDE = "step_details.tool_calls[*].file_search.results[*].content"
REPORT = b"""# Edgar Corp annual report 2023

Edgar Corp opened three new offices in 2023, in Lisbon, Osaka and Toronto.
Revenue grew 12 percent to 42 million dollars.
"""
RISKS = b"""# Edgar Corp risk register

The main risk is the concentration of revenue in two customers.
"""


def readme_block(containing: str) -> str:
    """The README's python code block that contains `containing`."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"expected one README python block with {containing!r}"
    return blocks[0]


def test_readme_quickstart_snippet_runs(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", stack.base_url)  # what the README tells the user to export
    monkeypatch.setenv("OPENAI_API_KEY", stack.api_key)
    printed: list[tuple[Any, ...]] = []
    namespace: dict[str, Any] = {"print": lambda *args: printed.append(args)}
    exec(readme_block("create_and_poll"), namespace)
    assert namespace["run"].status == "completed"
    assert [p[0] for p in printed] == ["user", "assistant"]
    assert "3x + 11 = 14" in printed[0][1] and "3x + 11 = 14" in printed[1][1]  # the scripted model echoes


def test_readme_webhook_registration_and_receiver(client: openai.OpenAI, stack: Stack,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Register as the README shows (the SDK requires `name`), then run the README's FastAPI receiver."""
    monkeypatch.setenv("OPENAI_API_KEY", stack.api_key)  # the receiver builds its own OpenAI()
    registration = readme_block("client.webhooks.create")
    receiver_code = readme_block("client.webhooks.unwrap")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hooks"
    namespace: dict[str, Any] = {"client": client}
    exec(registration.replace("https://example.com/hooks", url), namespace)
    endpoint = namespace["endpoint"]
    try:
        assert namespace["secret"].startswith("whsec_")
        assert endpoint.url == url

        monkeypatch.setenv("WEBHOOK_SECRET", namespace["secret"])
        received: list[tuple[Any, ...]] = []
        app_ns: dict[str, Any] = {"print": lambda *args: received.append(args)}
        exec(receiver_code, app_ns)
        server = uvicorn.Server(uvicorn.Config(app_ns["app"], log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            assistant = client.beta.assistants.create(model="gpt-4o")
            run = client.beta.threads.create_and_run_poll(
                assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "hello"}]},
                poll_interval_ms=200)
            assert run.status == "completed"
            deadline = time.monotonic() + 20
            while ("thread.run.completed", run.id) not in received and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ("thread.run.completed", run.id) in received  # delivered, verified by unwrap, printed
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        sock.close()
        client.webhooks.delete(endpoint.id)


def _search_calls(client: openai.OpenAI, thread_id: str, run_id: str) -> list[Any]:
    steps = client.beta.threads.runs.steps.list(thread_id=thread_id, run_id=run_id, order="asc", include=[INCLUDE])
    return [c for s in steps if s.step_details.type == "tool_calls" for c in s.step_details.tool_calls
            if c.type == "file_search"]


def test_message_attachment_for_file_search_is_searched(client: openai.OpenAI, marker: str) -> None:
    """A file attached to a message with the file_search tool goes into the thread's vector store (created
    with the hosted 7-day last_active_at expiry) and the run finds it, as on the hosted API."""
    report = client.files.create(file=("edgar.md", REPORT), purpose="assistants")
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    search = '[[call:file_search:{"query": "How many offices opened?"}]]'
    thread = client.beta.threads.create(messages=[{
        "role": "user", "content": f"{marker} How many offices did Edgar open? {search}",
        "attachments": [{"file_id": report.id, "tools": [{"type": "file_search"}]}]}])

    assert thread.tool_resources and thread.tool_resources.file_search
    [store_id] = thread.tool_resources.file_search.vector_store_ids or []
    assert client.beta.threads.retrieve(thread.id).tool_resources == thread.tool_resources
    store = client.vector_stores.retrieve(store_id)
    assert store.expires_after is not None
    assert (store.expires_after.anchor, store.expires_after.days) == ("last_active_at", 7)
    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store_id)] == [report.id]

    # no polling of the store first: the run waits for the thread's files (hosted: up to 60 s)
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200)
    assert run.status == "completed", run.last_error
    [call] = _search_calls(client, thread.id, run.id)
    assert call.file_search.results and call.file_search.results[0].file_id == report.id
    assert "Lisbon" in (call.file_search.results[0].content or [])[0].text
    [answer] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    assert answer.content[0].type == "text"
    citations = [a for a in answer.content[0].text.annotations if a.type == "file_citation"]
    assert citations and citations[0].file_citation.file_id == report.id

    # a later message's attachment joins the same thread store
    risks = client.files.create(file=("risks.md", RISKS), purpose="assistants")
    client.beta.threads.messages.create(
        thread_id=thread.id, role="user", content=f"{marker} And the risks? "
        '[[call:file_search:{"query": "main risk customers"}]]',
        attachments=[{"file_id": risks.id, "tools": [{"type": "file_search"}]}])
    assert client.beta.threads.retrieve(thread.id).tool_resources == thread.tool_resources
    assert {f.id for f in client.vector_stores.files.list(vector_store_id=store_id)} == {report.id, risks.id}
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200)
    assert run.status == "completed", run.last_error
    [call] = _search_calls(client, thread.id, run.id)
    assert risks.id in {r.file_id for r in call.file_search.results}


def test_create_and_run_attachment_creates_thread_store(client: openai.OpenAI) -> None:
    """createThreadAndRun and additional_messages take attachments the same way; a code_interpreter-only
    attachment makes no vector store."""
    report = client.files.create(file=("edgar.md", REPORT), purpose="assistants")
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    run = client.beta.threads.create_and_run_poll(assistant_id=assistant.id, poll_interval_ms=200, thread={
        "messages": [{"role": "user", "content": "offices? [[call:file_search:{\"query\": \"offices\"}]]",
                      "attachments": [{"file_id": report.id, "tools": [{"type": "file_search"}]}]}]})
    assert run.status == "completed", run.last_error
    thread = client.beta.threads.retrieve(run.thread_id)
    assert thread.tool_resources and thread.tool_resources.file_search
    assert len(thread.tool_resources.file_search.vector_store_ids or []) == 1
    [call] = _search_calls(client, thread.id, run.id)
    assert [r.file_id for r in call.file_search.results][:1] == [report.id]

    plain = client.beta.threads.create()
    run = client.beta.threads.runs.create_and_poll(
        thread_id=plain.id, assistant_id=assistant.id, poll_interval_ms=200,
        additional_messages=[{"role": "user", "content": "just code",
                              "attachments": [{"file_id": report.id, "tools": [{"type": "code_interpreter"}]}]}])
    assert run.status == "completed", run.last_error
    resources = client.beta.threads.retrieve(plain.id).tool_resources
    assert resources is None or resources.file_search is None


def test_attachment_of_an_unknown_file_is_refused(client: openai.OpenAI) -> None:
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.messages.create(thread_id=thread.id, role="user", content="x", attachments=[
            {"file_id": "file-missing", "tools": [{"type": "file_search"}]}])
    assert client.beta.threads.messages.list(thread_id=thread.id).data == []
    resources = client.beta.threads.retrieve(thread.id).tool_resources
    assert resources is None or resources.file_search is None


def test_responses_carry_a_request_id_the_sdk_exposes(client: openai.OpenAI) -> None:
    """Hosted code logs `obj._request_id` or an error's `request_id` (the SDK's documented way to report a failing
    request): both were None. Every response, errors and streams too, has its own `x-request-id`."""
    assistant = client.beta.assistants.create(model="gpt-4o")
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.assistants.retrieve("asst_missing")
    with client.beta.threads.create_and_run(assistant_id=assistant.id, stream=True,
                                            thread={"messages": [{"role": "user", "content": "[[reply:hi]]"}]}) as s:
        streamed = s.response.headers.get("x-request-id")
        assert [event.event for event in s][-1] == "thread.run.completed"
    ids = [assistant._request_id, err.value.request_id, streamed]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", str(i)) for i in ids) and len(set(ids)) == 3, ids


SALES = b"month,sales\nJan,120\nFeb,135\nMar,160\nApr,150\nMay,190\nJun,210\n"


def test_offline_model_answers_the_docs_chart_request_with_an_image_and_a_file(client: openai.OpenAI) -> None:
    """The docs' code_interpreter flow on make run's offline model (`[[mode:offline]]` here): a CSV in tool_resources,
    a chart asked for, the image_file and the file_path downloaded. Its code printed a greeting: neither came."""
    data = client.files.create(file=("mydata.csv", SALES), purpose="assistants")
    assistant = client.beta.assistants.create(
        model="gpt-4o", tools=[{"type": "code_interpreter"}],
        tool_resources={"code_interpreter": {"file_ids": [data.id]}},
        instructions="You are a personal math tutor. When asked a math question, write and run code to answer it.")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        "Create a line chart of the monthly sales in my CSV file, and save the data as a new CSV I can download."
        " [[mode:offline]]")}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200)
    assert run.status == "completed", run.last_error
    [answer] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    [image, text] = answer.content
    assert image.type == "image_file" and text.type == "text"
    assert client.files.content(image.image_file.file_id).read().startswith(b"\x89PNG\r\n\x1a\n")
    assert "Plotted sales from mydata.csv" in text.text.value
    [link] = text.text.annotations
    assert link.type == "file_path" and link.text == "sandbox:/mnt/data/mydata_summary.csv"
    summary = client.files.content(link.file_path.file_id).read().decode()
    assert summary.startswith(",month,sales\ncount,6,6.0\n")


def test_offline_model_solves_the_docs_quickstart_equation(client: openai.OpenAI) -> None:
    """The docs' math tutor on make run's offline model (`[[mode:offline]]` here): it answered with a greeting its
    code printed; its code now solves the equation in the sandbox."""
    assistant = client.beta.assistants.create(
        name="Math Tutor", model="gpt-4o", tools=[{"type": "code_interpreter"}],
        instructions="You are a personal math tutor. Write and run code to answer math questions.")
    question = "I need to solve the equation `3x + 11 = 14`. Can you help me? [[mode:offline]]"
    assert assistant_reply(client, assistant.id, question) == "Tool results: 3x + 11 = 14: x = 1"


def test_offline_model_answers_the_docs_file_search_flow_with_brief_citations(client: openai.OpenAI) -> None:
    """The docs' file_search flow on make run's offline model (`[[mode:offline]]` here): files in a batch, the
    store on the assistant, a message attachment, citations replaced as the docs do. The answer held every chunk
    whole; now a line per result, each cited."""
    long_report = REPORT + b"\n".join(b"Line %d of the appendix repeats the figures once more." % i for i in range(80))
    store = client.vector_stores.create(name="Financial Statements")
    batch = client.vector_stores.file_batches.upload_and_poll(
        vector_store_id=store.id, files=[("edgar-report.md", long_report), ("edgar-risks.txt", RISKS)])
    assert batch.status == "completed" and batch.file_counts.completed == 2
    assistant = client.beta.assistants.create(
        name="Financial Analyst Assistant", model="gpt-4o", tools=[{"type": "file_search"}],
        instructions="You are an expert financial analyst. Use you knowledge base to answer questions.",
        tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    attached = client.files.create(file=("edgar-board.md", b"# Board\n\nThe board met four times in 2023.\n"),
                                   purpose="assistants")
    thread = client.beta.threads.create(messages=[{
        "role": "user", "content": "Which cities did Edgar open offices in? [[mode:offline]]",
        "attachments": [{"file_id": attached.id, "tools": [{"type": "file_search"}]}]}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200)
    assert run.status == "completed", run.last_error
    message_content = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data[0].content[0]
    assert message_content.type == "text"
    text = message_content.text
    citations = []
    for index, annotation in enumerate(text.annotations):
        text.value = text.value.replace(annotation.text, f"[{index}]")
        assert annotation.type == "file_citation"
        citations.append(client.files.retrieve(annotation.file_citation.file_id).filename)
    [call] = _search_calls(client, thread.id, run.id)
    assert citations == [r.file_name for r in call.file_search.results]
    assert {"edgar-report.md", "edgar-risks.txt", "edgar-board.md"} <= set(citations)
    lines = text.value.removeprefix("Tool results: ").split("\n")
    assert len(lines) == len(citations) and all(len(line) <= 200 for line in lines)
    report = citations.index("edgar-report.md")
    assert lines[report].startswith(f"[{report}] edgar-report.md: Edgar Corp annual report 2023 Edgar Corp opened")
    assert lines[report].endswith("...")
