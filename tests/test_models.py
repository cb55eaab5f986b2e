"""The Models API (`GET /v1/models`, `GET /v1/models/{model}`, `DELETE /v1/models/{model}`), answered by the run
orchestrator over Kafka (threadline.model.requests, replies on threadline.search.replies).

Through the real `openai` SDK against the real stack, whose orchestrator lists the scripted model server's models
(cached for 1 s in the test stack): the list and one model in exactly the SDK's shapes, ids with `/` and `:`, the
hosted 404 for an unknown model, a failing or older model server, a gateway that waits too little (504), and the
orchestrator skipping requests past their deadline. Unit tests: the cache, the shapes and the upstream errors, a real
client against a port where nothing listens.
"""

import asyncio
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from run_helpers import poll

from run_orchestrator.catalog import ModelCatalog, ModelsUnavailable, as_models
from run_orchestrator.handlers import ModelRequestHandlers
from run_orchestrator.model import ModelClient
from threadline_core.events import EventEnvelope, ModelsRequested, ServiceReplied
from threadline_core.kafka import create_producer
from threadline_core.metrics import ModelsServedMetrics
from threadline_core.topics import MODEL_REQUESTS
from threadline_devstack.model_server import MODELS, ScriptedModelServer
from threadline_devstack.stack import ServiceProcess, Stack

SLASHED = "meta-llama/Llama-3.1-8B-Instruct"
COLONED = "llama3.1:8b"
ALIAS = "gpt-4-32k"
"""THREADLINE_MODEL_ALIASES of the test stack maps it to COLONED: listed after the served models, as COLONED."""


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples `name` with `labels` that <url>/metrics shows now."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture
def sdk(stack: Stack) -> Iterator[openai.OpenAI]:
    """An SDK client that does not retry (a 5xx shows at once)."""
    client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def served(model: ScriptedModelServer, sdk: openai.OpenAI) -> Iterator[list[str]]:
    """The model server lists ids with `/` and `:` too, and the orchestrator has seen them."""
    ids = [*MODELS, SLASHED, COLONED]
    model.model_ids = ids
    poll(lambda: [m.id for m in sdk.models.list()] == [*ids, ALIAS], timeout=20, what="the new ids to be listed")
    yield ids
    model.model_ids = list(MODELS)


@pytest.fixture
def failing(model: ScriptedModelServer) -> Iterator[ScriptedModelServer]:
    """The model server's GET /v1/models answers what the test sets in `models_status` (reset after)."""
    yield model
    model.models_status = None


def _status(sdk: openai.OpenAI, status: int) -> openai.APIStatusError | None:
    """The SDK's error for `status` once `models.list()` raises it (the cache may serve the old list a moment)."""
    try:
        sdk.models.list()
    except openai.APIStatusError as exc:
        return exc if exc.status_code == status else None
    return None


# ---------------------------------------------------------------------------------------------------
# end to end (the stack)
# ---------------------------------------------------------------------------------------------------


def test_list_models_gives_the_model_servers_models_as_the_sdk_types(sdk: openai.OpenAI, http: httpx.Client,
                                                                     served: list[str]) -> None:
    """`client.models.list()` lists what the model server serves, in its order; the body is exactly
    ListModelsResponse of `openai.types.Model`s."""
    page = sdk.models.list()
    assert [m.id for m in page] == [*served, ALIAS]
    assert all(isinstance(m, openai.types.Model) for m in page)
    response = http.get("/models")
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": [
        {"id": i, "object": "model", "created": 1_700_000_000, "owned_by": "threadline"} for i in [*served, ALIAS]]}


def test_retrieve_takes_ids_with_slashes_and_colons(sdk: openai.OpenAI, http: httpx.Client,
                                                    served: list[str]) -> None:
    for model_id in (SLASHED, COLONED, "gpt-4o", ALIAS):
        found = sdk.models.retrieve(model_id)
        assert found.id == model_id and found.object == "model" and found.owned_by == "threadline"
        assert http.get(f"/models/{model_id}").json() == {"id": model_id, "object": "model",
                                                          "created": 1_700_000_000, "owned_by": "threadline"}
    assert http.get("/models/meta-llama%2FLlama-3.1-8B-Instruct").json()["id"] == SLASHED


def test_an_unknown_model_is_the_hosted_404(sdk: openai.OpenAI, http: httpx.Client, served: list[str]) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("nope/not-a-model:1b")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    response = http.get("/models/gpt-4o-nope")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model 'gpt-4o-nope' does not exist",
                                         "type": "invalid_request_error", "param": "model",
                                         "code": "model_not_found"}}
    assert http.get("/models/gpt-4o/").status_code == 404  # an id is matched whole


def test_delete_is_refused_in_the_openai_format(sdk: openai.OpenAI, http: httpx.Client, served: list[str]) -> None:
    """Nothing here is a fine-tuned model: a served one is a 403, an unknown one the 404 of retrieve."""
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk.models.delete(SLASHED)
    assert err.value.code == "model_not_deletable" and err.value.param == "model"
    error = http.delete("/models/gpt-4o").json()["error"]
    assert error["type"] == "invalid_request_error" and "cannot be deleted" in error["message"]
    with pytest.raises(openai.NotFoundError):
        sdk.models.delete("nope")
    assert [m.id for m in sdk.models.list()] == [*served, ALIAS]


def test_models_need_an_api_key(stack: Stack) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        for path in ("/v1/models", "/v1/models/gpt-4o"):
            response = httpx.get(f"{stack.gateway_url}{path}", headers=headers, trust_env=False, timeout=10)
            assert response.status_code == 401, response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=stack.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()


def test_a_failing_model_server_is_a_502_saying_so(sdk: openai.OpenAI, http: httpx.Client,
                                                   failing: ScriptedModelServer, served: list[str]) -> None:
    """The server's 5xx reaches the client as a 502 `server_error` naming what failed (not a 404, not a crash);
    retrieve too; once the server is back, the list is."""
    failing.models_status = 503
    error = poll(lambda: _status(sdk, 502), timeout=20, what="the failure to show")
    assert error.body == {"message": "The model server answered HTTP 503 to GET /models: scripted GET /v1/models "
                                     "failure (503)", "type": "server_error", "param": None, "code": None}
    response = http.get(f"/models/{SLASHED}")
    assert response.status_code == 502 and response.json()["error"]["type"] == "server_error"
    failing.models_status = None
    poll(lambda: [m.id for m in sdk.models.list()] == [*served, ALIAS], timeout=20, what="the list to come back")


def test_a_model_server_without_a_models_route_lists_nothing(sdk: openai.OpenAI, failing: ScriptedModelServer,
                                                            served: list[str]) -> None:
    """A server with no GET /models (404) lists no model but the aliases, rather than failing every model picker."""
    failing.models_status = 404
    assert poll(lambda: [m.id for m in sdk.models.list()] == [ALIAS], timeout=20, what="the list of the alias alone")
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")


@pytest.fixture(scope="module")
def impatient_gateway(stack: Stack) -> Iterator[ServiceProcess]:
    """A second gateway that waits only 1 ms for the orchestrator's reply (none comes that fast)."""
    with stack.extra_instance("gateway", env={"THREADLINE_MODELS_TIMEOUT_SECONDS": "0.001"}) as process:
        yield process


def test_no_reply_in_time_is_a_504(impatient_gateway: ServiceProcess, stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{impatient_gateway.url}/v1", api_key=stack.api_key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        sdk.models.list()
    sdk.close()
    assert err.value.status_code == 504
    assert err.value.body == {"message": "The models were not listed within 0.001 seconds (the run orchestrator is "
                                         "busy or unavailable); retry shortly.", "type": "server_error",
                              "param": None, "code": None}
    assert metric(impatient_gateway.url, "threadline_models_requests_total", outcome="timeout") >= 1


async def test_the_orchestrator_skips_requests_past_their_deadline(stack: Stack) -> None:
    url = stack.service("run_orchestrator").url
    before = metric(url, "threadline_models_served_total", operation="models", outcome="expired")
    request = ModelsRequested(reply_to="test-gone", deadline=datetime.now(UTC) - timedelta(seconds=1))
    producer: AIOKafkaProducer = create_producer(stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(MODEL_REQUESTS, request.envelope(project_id="proj_local",
                                                                      key=request.request_id).to_bytes(),
                                     key=request.request_id.encode())
    finally:
        await producer.stop()
    for _ in range(200):
        if metric(url, "threadline_models_served_total", operation="models", outcome="expired") > before:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the expired request was not skipped")


# ---------------------------------------------------------------------------------------------------
# unit
# ---------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Lister:
    """Stands in for the model server's GET /models: returns `items` or raises `error`, counting calls."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.error: Exception | None = None
        self.calls = 0
        self.timeouts: list[float] = []

    async def __call__(self, seconds: float) -> list[Any]:
        self.calls += 1
        self.timeouts.append(seconds)
        await asyncio.sleep(0.01)
        if self.error is not None:
            raise self.error
        return self.items


def _status_error(status: int, body: Any) -> openai.APIStatusError:
    request = httpx.Request("GET", "http://model/v1/models")
    response = httpx.Response(status, request=request, json=body)
    cls = openai.NotFoundError if status == 404 else openai.InternalServerError
    return cls("failed", response=response, body=body)


@pytest.mark.unit
async def test_the_catalog_lists_once_per_ttl_and_keeps_no_failure() -> None:
    clock = _Clock()
    lister = _Lister([{"id": "a", "object": "model", "created": 1, "owned_by": "x"}])
    catalog = ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10, clock=clock)
    assert [m["id"] for m in await catalog.models()] == ["a"]
    await asyncio.gather(*(catalog.models() for _ in range(5)))
    assert lister.calls == 1
    clock.now += 59
    await catalog.models()
    assert lister.calls == 1
    clock.now += 2
    lister.items = [{"id": "b"}]
    assert [m["id"] for m in await catalog.models()] == ["b"]
    assert lister.calls == 2
    clock.now += 61
    lister.error = _status_error(500, {"error": {"message": "boom"}})
    with pytest.raises(ModelsUnavailable) as err:
        await catalog.models()
    assert err.value.status == 502 and err.value.message == "The model server answered HTTP 500 to GET /models: boom"
    lister.error = None
    assert [m["id"] for m in await catalog.models()] == ["b"]
    assert lister.calls == 4


@pytest.mark.unit
async def test_the_names_runs_can_use_through_aliases_are_models_too(caplog: pytest.LogCaptureFixture) -> None:
    """THREADLINE_MODEL_ALIASES: a name a run can use is a model a client can list and retrieve, as the model it
    names; with `*`, any name; an alias naming what the server does not list is logged for the operator."""
    llama = {"id": "llama3.1:8b", "object": "model", "created": 7, "owned_by": "library"}
    lister = _Lister([llama])
    aliases = {"gpt-4-turbo": "llama3.1:8b", "llama3.1:8b": "llama3.1:8b", "gpt-4o": "qwen2.5"}
    catalog = ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10, aliases=aliases)
    assert await catalog.models() == [llama, {**llama, "id": "gpt-4-turbo"},
                                      {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "system"}]
    assert "maps gpt-4o to qwen2.5, which the model server does not list" in caplog.text
    assert await catalog.model("gpt-4-turbo") == {**llama, "id": "gpt-4-turbo"}
    assert await catalog.model("o3-mini") is None
    anything = ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10, aliases={"*": "llama3.1:8b"})
    assert await anything.models() == [llama]
    assert await anything.model("o3-mini") == {**llama, "id": "o3-mini"}


@pytest.mark.unit
async def test_the_orchestrator_says_at_start_what_the_model_endpoint_lists(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong THREADLINE_MODEL_BASE_URL or key showed only when the first run failed."""
    lister = _Lister([{"id": "llama3.1:8b"}, {"id": "qwen2.5"}])
    caplog.set_level("INFO", logger="run_orchestrator.catalog")
    await ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10).report("http://ollama:11434/v1")
    assert "model endpoint http://ollama:11434/v1 lists 2 models: llama3.1:8b, qwen2.5" in caplog.text
    loading = [_status_error(500, {"error": {"message": "loading model"}})] * 2

    async def loads_first(seconds: float) -> list[Any]:
        if loading:  # a server still loading its model: asked again until it answers
            raise loading.pop()
        return await lister(seconds)
    await asyncio.wait_for(ModelCatalog(loads_first, ttl_seconds=60, timeout_seconds=10).report(
        "http://vllm:8000/v1", retry_seconds=0.01), 5)
    assert not loading
    assert ("model endpoint http://vllm:8000/v1: The model server answered HTTP 500 to GET /models: loading model "
            "(asked again in 0.01 s)" in caplog.text)
    assert "model endpoint http://vllm:8000/v1 lists 2 models" in caplog.text


@pytest.mark.unit
async def test_concurrent_requests_share_one_listing() -> None:
    lister = _Lister([{"id": "a"}])
    catalog = ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10)
    await asyncio.gather(*(catalog.models() for _ in range(10)))
    assert lister.calls == 1


@pytest.mark.unit
async def test_the_catalog_bounds_the_servers_time_by_the_askers_wait() -> None:
    lister = _Lister([])
    catalog = ModelCatalog(lister, ttl_seconds=0, timeout_seconds=10)
    await catalog.models()
    await catalog.models(within=3)
    await catalog.models(within=-1)
    assert lister.timeouts == [10, 3, 0.1]


@pytest.mark.unit
async def test_a_server_without_the_route_lists_nothing() -> None:
    lister = _Lister([])
    lister.error = _status_error(404, {"detail": "Not Found"})
    assert await ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10).models() == []


@pytest.mark.unit
def test_models_are_shaped_as_the_sdk_model() -> None:
    """Extra fields go, a missing `created` is 0 and a missing `owned_by` "system"; entries without an id are
    skipped and each id is listed once."""
    items = [{"id": "vllm", "object": "model", "created": 1715000000, "owned_by": "vllm", "root": "x",
              "max_model_len": 8192, "permission": []},
             {"id": "lmstudio", "object": "model", "owned_by": "organization_owner"},
             {"id": "bare"}, {"id": ""}, {"object": "model"}, "junk", {"id": "vllm", "owned_by": "other"},
             {"id": "float", "created": 1.5e9, "owned_by": None}]
    assert as_models(items) == [
        {"id": "vllm", "object": "model", "created": 1715000000, "owned_by": "vllm"},
        {"id": "lmstudio", "object": "model", "created": 0, "owned_by": "organization_owner"},
        {"id": "bare", "object": "model", "created": 0, "owned_by": "system"},
        {"id": "float", "object": "model", "created": 1_500_000_000, "owned_by": "system"}]
    for model in as_models(items):
        assert openai.types.Model.model_validate(model).model_dump(exclude_unset=True) == model


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.unit
async def test_an_unreachable_model_server_is_a_503() -> None:
    """A real client against a port where nothing listens: 503 saying the server could not be reached."""
    client = ModelClient(base_url=f"http://127.0.0.1:{_closed_port()}/v1", api_key="k", timeout=5, max_retries=0,
                         retry_backoff=0)
    try:
        with pytest.raises(ModelsUnavailable) as err:
            await ModelCatalog(client.list_models, ttl_seconds=60, timeout_seconds=5).models()
    finally:
        await client.close()
    assert err.value.status == 503
    assert err.value.message.startswith("The model server could not be reached to list its models")


@pytest.mark.unit
async def test_a_real_client_lists_the_scripted_server() -> None:
    with ScriptedModelServer() as server:
        server.model_ids = [SLASHED, "b"]
        client = ModelClient(base_url=server.base_url, api_key="k", timeout=5, max_retries=0, retry_backoff=0)
        try:
            models = await ModelCatalog(client.list_models, ttl_seconds=60, timeout_seconds=5).models()
        finally:
            await client.close()
    assert [m["id"] for m in models] == [SLASHED, "b"]


@pytest.mark.unit
async def test_the_context_length_vllm_lists_is_known_per_model() -> None:
    """vLLM lists each model's `max_model_len`: runs on it are cut to fit as with THREADLINE_MODEL_CONTEXT_TOKENS;
    an alias has the context of the model it names; an unlisted model's is unknown (0)."""
    with ScriptedModelServer() as server:
        server.model_ids, server.model_context = [SLASHED, "b"], {SLASHED: 4096}
        client = ModelClient(base_url=server.base_url, api_key="k", timeout=5, max_retries=0, retry_backoff=0,
                             aliases={"gpt-4-turbo": SLASHED})
        try:
            assert client.context_tokens(SLASHED) == 0  # nothing listed yet
            models = await client.list_models(5)
        finally:
            await client.close()
    assert [m.get("max_model_len") for m in models] == [4096, None]
    assert [client.context_tokens(m) for m in (SLASHED, "gpt-4-turbo", "b", "c")] == [4096, 4096, 0, 0]


class _Producer:
    """Takes the replies the handler sends (what SEARCH_REPLIES would carry)."""

    def __init__(self) -> None:
        self.replies: list[ServiceReplied] = []
        self.keys: list[bytes] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> "asyncio.Future[None]":
        self.replies.append(ServiceReplied.parse(EventEnvelope.from_bytes(value)))
        self.keys.append(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _handlers(lister: _Lister) -> tuple[ModelRequestHandlers, _Producer, ModelsServedMetrics]:
    producer = _Producer()
    metrics = ModelsServedMetrics(CollectorRegistry())
    catalog = ModelCatalog(lister, ttl_seconds=60, timeout_seconds=10)
    return ModelRequestHandlers(catalog, producer, metrics), producer, metrics  # type: ignore[arg-type]


def _envelope(request: ModelsRequested) -> EventEnvelope:
    return request.envelope(project_id="proj_local", key=request.request_id)


@pytest.mark.unit
async def test_the_handler_answers_filters_skips_and_refuses() -> None:
    lister = _Lister([{"id": "a"}, {"id": SLASHED}])
    handlers, producer, metrics = _handlers(lister)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    await handlers.handle(_envelope(ModelsRequested(request_id="req_1", reply_to="gw", deadline=soon)))
    await handlers.handle(_envelope(ModelsRequested(request_id="req_2", reply_to="gw", deadline=soon,
                                                    model=SLASHED)))
    await handlers.handle(_envelope(ModelsRequested(request_id="req_3", reply_to="gw", deadline=soon, model="x")))
    await handlers.handle(_envelope(ModelsRequested(request_id="req_4", reply_to="gw",
                                                    deadline=datetime.now(UTC) - timedelta(seconds=1))))
    await handlers.handle(EventEnvelope(type=ModelsRequested.TYPE, project_id="proj_local", key="req_5",
                                        data={"request_id": "req_5", "reply_to": "gw", "model": ["not", "a", "str"]}))
    by_id = {reply.request_id: reply for reply in producer.replies}
    assert set(by_id) == {"req_1", "req_2", "req_3", "req_5"} and set(producer.keys) == {b"gw"}
    assert [m["id"] for m in by_id["req_1"].items] == ["a", SLASHED]
    assert [m["id"] for m in by_id["req_2"].items] == [SLASHED]
    assert by_id["req_3"].items == [] and by_id["req_3"].error is None
    refused = by_id["req_5"].error
    assert refused is not None and refused.status == 400 and refused.param == "model"
    assert lister.calls == 1
    assert metrics.requests.labels(operation="models", outcome="expired")._value.get() == 1


@pytest.mark.unit
async def test_the_handler_answers_a_failure_with_its_status() -> None:
    lister = _Lister([])
    lister.error = openai.APITimeoutError(httpx.Request("GET", "http://model/v1/models"))
    handlers, producer, _ = _handlers(lister)
    await handlers.handle(_envelope(ModelsRequested(request_id="req_1", reply_to="gw",
                                                    deadline=datetime.now(UTC) + timedelta(seconds=5))))
    error = producer.replies[0].error
    assert error is not None and error.status == 504 and error.type == "server_error"
    assert error.message.startswith("The model server did not list its models within 5 seconds")
